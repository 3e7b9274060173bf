"""Per-layer linear weights and fine-tuning updates, shared by the post-fine-tuning defenses.

A *target* is a linear weight inside a decoder layer (``nn.Linear``, or GPT-2's ``Conv1D``), found by type
and named ``"<layer index>.<path inside the layer>"`` (e.g. ``"0.self_attn.q_proj"``), so that one name
finds the same weight in the fine-tuned, aligned and base models, bare or wrapped in PEFT/DDP. Weights are
read and written in ``(out, in)`` orientation whatever the module stores, in float32 for the maths.

The fine-tuning update of a target is ΔW = W_finetuned − W_aligned; for a merged LoRA fine-tune it is
exactly the adapter's s·B·A. :func:`plain` merges a PEFT model first, so every method sees one layout.
Methods defined on the LoRA factors themselves get them from :func:`finetuned_lora`: the PEFT model given,
or the adapter the fine-tune stage saved next to the merged model (``<ctx.finetuned_path>/adapter``).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..models.introspect import decoder_layers

log = logging.getLogger(__name__)


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


@dataclass
class Target:
    """One linear weight of a decoder layer."""

    name: str
    layer: int
    module: nn.Module

    @property
    def transposed(self) -> bool:  # Conv1D stores (in, out)
        return not isinstance(self.module, nn.Linear)

    def read(self) -> torch.Tensor:
        """A float32 copy of the weight, ``(out, in)``."""
        w = self.module.weight.detach()
        return (w.t() if self.transposed else w).float().clone()

    def write(self, value: torch.Tensor) -> None:
        """Overwrite the weight with ``value`` given ``(out, in)``."""
        w = self.module.weight
        with torch.no_grad():
            w.copy_((value.t() if self.transposed else value).to(device=w.device, dtype=w.dtype))


def targets(model: nn.Module) -> dict[str, Target]:
    """Every linear weight inside the decoder layers, by name (PEFT's LoRA sub-modules excluded)."""
    kinds = _linear_types()
    out: dict[str, Target] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for rel, module in layer.named_modules():
            parts = rel.split(".")
            if not isinstance(module, kinds) or any(p.startswith("lora_") for p in parts):
                continue
            if parts[-1] == "base_layer":  # PEFT wraps the original linear: name it as the wrapper
                parts = parts[:-1]
            name = f"{i}." + ".".join(parts)
            out[name] = Target(name, i, module)
    return out


def plain(model: nn.Module) -> nn.Module:
    """The model with any PEFT adapter merged into its weights (the input object is consumed)."""
    from ..models.loading import merged

    return merged(model)


def updates(model: nn.Module, aligned: nn.Module) -> Iterator[tuple[Target, Target, torch.Tensor]]:
    """(target, aligned target, ΔW) for each target the fine-tuning changed, in layer order.

    ``model`` must be plain (see :func:`plain`). Computed one layer at a time, so a 7B model never holds
    more than one ΔW per step of the iteration.
    """
    ref = targets(aligned)
    for name, t in targets(model).items():
        if name not in ref:
            raise ValueError(f"aligned model has no weight '{name}': not the same architecture")
        delta = t.read() - ref[name].read()
        if torch.count_nonzero(delta):
            yield t, ref[name], delta


def set_update(t: Target, ref: Target, delta: torch.Tensor) -> None:
    """W ← W_aligned + delta for one target."""
    t.write(ref.read() + delta)


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """The PEFT LoRA layers of the decoder, by target name (as :func:`targets` names their weights)."""
    from peft.tuners.lora import LoraLayer

    return {f"{i}.{rel}": m for i, layer in enumerate(decoder_layers(model))
            for rel, m in layer.named_modules() if isinstance(m, LoraLayer)}


def lora_factors(layer: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A ``(r, in)``, B ``(out, r)``, scaling s) of a LoRA layer's active adapter: its ΔW is s·B·A."""
    name = layer.active_adapters[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def finetuned_lora(model: nn.Module, ctx: Any) -> nn.Module | None:
    """The fine-tuned model as a PEFT LoRA model on the aligned weights, or None when it is not one.

    A PEFT model is returned as is. For a merged model, the adapter saved next to it by the fine-tune
    stage is loaded onto a copy of the aligned model and kept only if merging it reproduces ``model``
    (it does not for the single-LoRA variant, whose adapter sits on the base model).
    """
    from peft import PeftModel

    from ..models.loading import peft_wrapping

    if isinstance(model, PeftModel):
        return model
    folder = Path(ctx.finetuned_path) / "adapter"
    if not ctx.finetuned_path or not (folder / "adapter_config.json").is_file():
        return None
    with peft_wrapping():  # without the FutureWarning peft causes in transformers 5
        peft = PeftModel.from_pretrained(copy.deepcopy(ctx.reference("aligned")), str(folder))
    check = targets(plain(copy.deepcopy(peft)))
    tol = 1e-5 if next(model.parameters()).dtype == torch.float32 else 1e-2
    same = all(torch.allclose(check[n].read(), t.read(), atol=tol, rtol=tol) for n, t in targets(model).items())
    if not same:
        log.info("the adapter in %s does not reproduce the fine-tuned model: not used", folder)
        return None
    return peft


def refusal_batches(model: nn.Module, ctx: Any, n: int, batch_size: int, method: str) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` refusal examples of the alignment set (a repair's safety data), collated in batches
    of ``batch_size`` on the model's device."""
    data = [ex for ex in ctx.data.get("alignment", []) if ex.kind == "refusal"][:n]
    if not data:
        raise KeyError(f"{method} needs refusal examples in ctx.data['alignment'] (its safety data)")
    feats = ctx.formatter.encode_all(data)
    dev = next(model.parameters()).device
    return [{k: v.to(dev) for k, v in ctx.formatter.collate(feats[i: i + batch_size]).items()}
            for i in range(0, len(feats), batch_size)]


def gram_sums(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict[str, torch.Tensor]],
              dtype: torch.dtype, answers_only: bool) -> dict[str, torch.Tensor]:
    """Σ xᵀ·x of each module's input over the batches' tokens: the answer tokens (labels ≠ −100) when
    ``answers_only``, else every non-padding token. Inputs are read by forward hooks, without grad."""
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, inp: tuple, _out: object) -> None:
            x = inp[0].detach().to(dtype)[current["mask"]]
            sums[name] = sums.get(name, 0) + x.T @ x
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["labels"] != -100 if answers_only else b["attention_mask"].bool()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return sums
