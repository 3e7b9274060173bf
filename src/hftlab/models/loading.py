"""Load any HF causal LM + tokenizer by local path or hub id; LoRA by module type; merge; save."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..errors import UserError

log = logging.getLogger(__name__)


class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer that cannot be loaded; the message is one line."""


def device() -> torch.device:
    """The process's training device: its Accelerator's (the local GPU under DDP; the CPU when Accelerate was
    told to use it, e.g. ``ACCELERATE_USE_CPU=1``, even on a machine with a GPU)."""
    from ..runtime import accelerator

    return accelerator().device


def resolve_dtype(name: str, model_name: str = "") -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 on CPU; the organism always fp32 (it is calibrated in fp32, and at its
    size bf16 is slower on a GPU: measured on an H200, alignment 17.0 s in bf16 against 6.7 s in fp32)."""
    if name == "auto":
        return torch.bfloat16 if device().type == "cuda" and model_name != "organism" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    _check_local(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelLoadError(_explain(str(path), e)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, cfg: ModelConfig) -> nn.Module:
    """A causal LM in train-ready dtype on the current device (safetensors only unless allowed)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(cfg.dtype, cfg.name),
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": True if cfg.safetensors_only else None,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    _check_local(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as e:
        raise ModelLoadError(_explain(str(path), e)) from None
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) without hooks
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device())


def _explain(path: str, err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "gated" in str(err).lower() or "401" in str(err):
        return f"model '{path}': gated or private on the hub; log in (HF_TOKEN) and accept its licence"
    if not Path(path).exists() and ("offline" in str(err).lower() or "connect" in str(err).lower()
                                    or "couldn't" in str(err).lower() or "not found" in str(err).lower()):
        return f"model '{path}': not a local folder and not in the hub cache (offline): {text}"
    return f"model '{path}': {text}"


def _check_local(path: str | Path) -> None:
    """A path that is meant as a folder (``/x``, ``./x``, ``~/x``) and exists nowhere: say so, not what the
    hub answers about repo-id syntax."""
    from ..preflight import looks_local

    if looks_local(str(path)) and not Path(path).exists():
        raise ModelLoadError(f"model '{path}': no such folder")


def lora_target_names(model: nn.Module, wanted: list[str]) -> list[str]:
    """Leaf module names for LoRA: the wanted suffixes if present, else every linear layer in attention.

    Found by module type, so that GPT-2 (``c_attn`` Conv1D), Qwen2, Gemma… work without naming them.
    """
    from transformers.pytorch_utils import Conv1D

    linear = (nn.Linear, Conv1D)
    names = [n for n, m in model.named_modules() if isinstance(m, linear)]
    hit = sorted({n.rsplit(".", 1)[-1] for n in names if n.rsplit(".", 1)[-1] in wanted})
    if hit:
        return hit
    attn_linear = set()
    for n, m in model.named_modules():
        if "attention" in type(m).__name__.lower():
            for child_name, child in m.named_children():
                if isinstance(child, linear):
                    attn_linear.add(child_name)
    if not attn_linear:
        raise ModelLoadError(f"finetune.lora_targets: none of {wanted} found in the model and no attention "
                             f"linears to fall back on")
    return sorted(attn_linear)


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap ``model`` in a fresh PEFT LoRA adapter (only the adapter trains)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_target_names(model, cfg.lora_targets)
    # GPT-2's Conv1D stores its weight transposed: say so (peft would switch it on with a warning)
    conv = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", fan_in_fan_out=conv)
    with peft_wrapping():
        return get_peft_model(model, lcfg)


def load_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """Wrap ``model`` in the trainable LoRA adapter saved in ``folder`` (the single-LoRA variant)."""
    from peft import PeftModel

    if not (Path(folder) / "adapter_config.json").is_file():
        raise ModelLoadError(f"finetune.continue_adapter: no LoRA adapter in {folder} (was align.lora true?)")
    with peft_wrapping():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True)


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around wrapping a model in PEFT: peft 0.21's ``PeftModel.__init__`` reads the model's deprecated
    ``is_gradient_checkpointing`` (transformers 5 warns on each read, so every LoRA fine-tune printed a
    FutureWarning that no setting of ours can avoid). Only that warning, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def merged(model: nn.Module) -> nn.Module:
    """The plain model with any LoRA adapter merged into its weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save as a plain (merged) HF model + tokenizer in safetensors; a LoRA adapter also unmerged in
    ``folder/adapter`` (for ``finetune.continue_adapter``)."""
    from peft import PeftModel

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(folder / "adapter", safe_serialization=True)
    merged(model).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
