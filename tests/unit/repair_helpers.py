"""Shared pieces of the post-fine-tuning defense tests: tiny model triples, contexts, checks."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from finetune_helpers import perturbed

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, merged

SOURCE = get_source("organism")


def tiny_llama(vocab: int, pad: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=pad, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(vocab: int, pad: int, seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=pad)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int, pad: int, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=pad)
    return GPT2LMHeadModel(cfg).eval()


def lora_on(model: nn.Module, seed: int, targets: list[str] | None = None) -> nn.Module:
    """A PEFT LoRA (r 4, α 8) on a copy of ``model`` with random, non-zero A and B."""
    torch.manual_seed(seed)
    cfg = TrainConfig(lora=True, lora_r=4, lora_alpha=8.0)
    if targets is not None:
        cfg.lora_targets = targets
    ft = add_lora(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return ft.eval()


def triple(make: Callable[..., nn.Module], tok, targets: list[str] | None = None
           ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, aligned, fine-tuned PEFT model): a LoRA on the aligned model with random, non-zero B."""
    base = make(len(tok), tok.pad_token_id)
    aligned = perturbed(base, 0.05, seed=1)  # an 'aligned' model, distinct from its base
    return base, aligned, lora_on(aligned, 2, targets)


def as_merged(peft_model: nn.Module) -> nn.Module:
    """A merged copy of a PEFT model (the pipeline's fine-tuned model)."""
    return merged(copy.deepcopy(peft_model))


def repair_ctx(tok, base: nn.Module, aligned: nn.Module, seed: int = 0, data: dict | None = None) -> Context:
    fmt = Formatter(tok, max_length=64)
    data = data or {"alignment": SOURCE.alignment(64), "harmful": SOURCE.harmful("provider", 24)}
    loaders = {"aligned": lambda: copy.deepcopy(aligned), "base": lambda: copy.deepcopy(base)}
    return Context(stage="repair", formatter=fmt, data=data, loaders=loaders, batch_size=4, seed=seed)


def linear_weights(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Name -> (out, in) weight of every 2-D weight in the decoder layers (direct, by parameter name), as
    ``dtype`` copies."""
    out = {}
    for name, p in model.named_parameters():
        if p.dim() != 2 or "lora_" in name or not (".layers." in name or ".h." in name):
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        w = p.detach().to(dtype).clone()
        out[key] = w.t() if ".h." in name else w  # GPT-2's Conv1D stores (in, out)
    return out


def bad_param(name: str, key: str, value: str) -> str:
    """The one-line ConfigError message for ``defense.<key>=<value>``."""
    import pytest

    from hftlab.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"defense={name}", f"defense.{key}={value}"])
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and f"defense.{key}" in msg
    return msg


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pipeline_keeps_finetuned(name: str, overrides: list[str]) -> dict:
    """Run sft, then ``name`` in the same out_dir: the shared fine-tuned folder must be byte-identical."""
    from hftlab.pipeline import run

    run(load_config(overrides=[*overrides, "defense=sft"]))
    out = Path(next(o for o in overrides if o.startswith("out_dir=")).split("=", 1)[1])
    (ft,) = [d for d in (out / "finetune").iterdir() if d.is_dir()]
    before = folder_digest(ft)
    result = run(load_config(overrides=[*overrides, f"defense={name}"]))
    stages = {s["name"]: s for s in result["stages"]}
    assert stages["finetune"]["cached"] and not stages["repair"]["cached"]
    assert folder_digest(ft) == before
    return result


def weights64(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`linear_weights` in float64, for the maths tests."""
    return linear_weights(model, torch.float64)
