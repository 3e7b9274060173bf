"""AsFT: penalise the part of the fine-tuning update that leaves the alignment direction.

Paper: Yang et al., "AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin",
arXiv 2506.08473.
Reference: PKU-YuanGroup/AsFT, ``utils/AsFT_train_utils.py`` (``train``: the regulariser),
``AsFT_finetuning.py`` (``SafeLoRA.get_aligned_matrix``: the anchor), ``configs/peft.py`` (LoRA r=8,
α=32 on q_proj, v_proj) and ``scripts/*/AsFT_reg1_p_0.1.sh`` (``lambda_reg`` = 1).

Per LoRA-adapted linear weight: the alignment direction V = W_aligned − W_base, its Safe LoRA matrix
C = V·Vᵀ / ‖V‖_F (as the reference: the Frobenius norm, not its square, so C is not an exact projector)
and the update ΔW = B·A of the adapter. Loss: ℓ_user + λ · Σ_layers ‖(I − C)·ΔW‖_F², which suppresses the
update's component outside the alignment direction's column space and leaves updates along it cheap.

Deviations:
- ΔW = B·A without the LoRA scaling s = α/r, as the reference writes it (the real update is s·B·A, so
  λ acts as λ·s⁻² on it); with hftlab's default LoRA (α=16, r=8) s = 2, the reference's s = 4.
- The layers are those the run's LoRA adapts (``finetune.lora_targets``; default q, k, v) matched by
  name to the aligned and base models' weights; the reference pairs its q/v projections by position.
- Without LoRA (full fine-tuning, where the reference applies no regulariser) ΔW = W − W_start of every
  decoder linear weight, the same penalty on the full update.
- A layer whose V is zero gets C = 0 (the whole update penalised), as Safe LoRA here.
- The reference adds λ·reg to a loss already divided by the accumulation steps; here the loop's
  accumulation scales both alike (the same at its grad_accum = 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ._weights import Target, lora_factors, lora_layers, targets
from .base import Context, Defense, lm_loss, upcast
from .safelora import projection

log = logging.getLogger(__name__)


@dataclass
class Config:
    lam: float = field(default=1.0, metadata=bounds(0.0))  # λ (scripts/*/AsFT_reg1_p_0.1.sh: lambda_reg=1)


def weight(t: Target) -> torch.Tensor:
    """A target's weight ``(out, in)``, detached, in its own precision (float32 for half precision)."""
    w = t.module.weight.detach()
    return upcast(w.t() if t.transposed else w)


def residual(c: torch.Tensor) -> torch.Tensor:
    """I − C."""
    return torch.eye(c.shape[0], dtype=c.dtype, device=c.device) - c


class AsFT(Defense):
    name = "asft"
    needs = ("aligned", "base")
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        aligned, base = targets(ctx.reference("aligned")), targets(ctx.reference("base"))
        self.terms: list[tuple[str, object, torch.Tensor]] = []  # (name, LoRA layer or Target, I − C)
        layers = lora_layers(model)
        found = layers or {n: t for n, t in targets(model).items() if t.module.weight.requires_grad}
        self.start: dict[str, torch.Tensor] = {}
        for name, layer in found.items():
            if name not in aligned or name not in base:
                raise ValueError(f"asft: the aligned/base model has no weight '{name}': not the same architecture")
            dtype = upcast(lora_factors(layer)[0] if layers else layer.module.weight).dtype
            v = (weight(aligned[name]) - weight(base[name])).to(device=ctx.device, dtype=dtype)
            self.terms.append((name, layer, residual(projection(v))))
            if not layers:
                self.start[name] = weight(layer).clone()
        if not self.terms:
            raise ValueError("asft: no trainable linear weight in the decoder layers")
        self.lora = bool(layers)
        for ref in ("aligned", "base"):  # only the anchors are needed: free the two reference models
            ctx._refs.pop(ref, None)
        log.info("asft: %d anchored weights (%s)", len(self.terms), "LoRA B·A" if self.lora else "full update")

    def update(self, name: str, layer: object) -> torch.Tensor:
        """ΔW of one anchored weight, ``(out, in)``."""
        if self.lora:
            a, b, _ = lora_factors(layer)
            return upcast(b) @ upcast(a)
        w = layer.module.weight
        w = w.t() if layer.transposed else w
        return upcast(w) - self.start[name]

    def penalty(self) -> torch.Tensor:
        """Σ ‖(I − C)·ΔW‖_F² (without λ), differentiable w.r.t. the trainable weights."""
        return sum(((r @ self.update(n, layer)) ** 2).sum() for n, layer, r in self.terms)

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        loss = lm_loss(model, batch)
        reg = self.penalty()
        ctx.backward(loss + self.cfg.lam * reg.to(loss.dtype))
        ctx.step_metrics["asft_penalty"] = reg.detach()
        return (loss + self.cfg.lam * reg.to(loss.dtype)).detach()
