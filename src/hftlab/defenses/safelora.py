"""Safe LoRA: project the fine-tuning update of the layers that leave the alignment subspace.

Paper: Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large Language
Models", NeurIPS 2024, arXiv 2405.16833.
Reference: IBM/SafeLoRA @ d81fda1, ``model.py`` (``SafeLoRA.get_aligned_matrix``, ``projected_weighted``)
and ``config.py`` (defaults: ``select_layers_type="number"``, ``num_proj_layers=10``, ``threshold=0.5``).

Per fine-tuned linear weight: V = W_aligned − W_base, C = V·Vᵀ / ‖V‖_F (Frobenius norm, not squared, as
in the paper and the reference), ΔW = W_finetuned − W_aligned, cos = cos(C·ΔW, ΔW) over the flattened
matrices (rounded to 5 decimals as the reference does). Layers with cos ≤ τ get ΔW ← C·ΔW.
``select="threshold"``: τ = ``threshold``; ``select="number"``: τ = the N-th lowest cosine.

Deviations:
- N is set by ``proj_fraction`` of the fine-tuned matrices (default 10/64: the reference's 10 layers of
  Llama-2-7B's 64 q/v LoRA matrices), so it scales to any model (the organism's 12 q/k/v matrices → 2);
  ``num_proj_layers`` > 0 sets N directly, as in the reference.
- Acts on the merged update ΔW (the pipeline saves merged models; a PEFT model is merged first). For LoRA,
  ΔW = s·B·A and the reference's edit B ← C·B gives exactly C·ΔW, so the result is the same.
- Layers are the decoder's linear weights that fine-tuning changed, found by type; the reference matched
  ``target_modules`` names and paired base/aligned parameters by position.
- A layer with V = 0 gets C = 0 (as SafeMERGE's port of this code does) instead of dividing by zero.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds, one_of
from ._weights import plain, set_update, targets, updates
from .base import Context, Defense

log = logging.getLogger(__name__)


def projection(v: torch.Tensor) -> torch.Tensor:
    """C = V·Vᵀ / ‖V‖_F (zeros when V = 0)."""
    norm = torch.linalg.matrix_norm(v)
    if norm == 0:
        return torch.zeros(v.shape[0], v.shape[0], dtype=v.dtype, device=v.device)
    return v @ v.T / norm


def cosine(c: torch.Tensor, delta: torch.Tensor) -> float:
    """cos(C·ΔW, ΔW) of the flattened matrices, rounded to 5 decimals (0 for a zero vector)."""
    cos = torch.nn.functional.cosine_similarity((c @ delta).flatten(), delta.flatten(), dim=0)
    return round(float(cos), 5)


@dataclass
class Config:
    select: str = field(default="number", metadata=one_of("number", "threshold"))
    threshold: float = field(default=0.5, metadata=bounds(-1.0, 1.0))  # τ of select="threshold"
    proj_fraction: float = field(default=10 / 64, metadata=bounds(0.0, 1.0))  # N / fine-tuned matrices
    num_proj_layers: int = field(default=0, metadata=bounds(0))  # > 0: N itself (reference default 10)


def layer_cosines(model: nn.Module, aligned: nn.Module, base: nn.Module) -> dict[str, float]:
    """cos(C·ΔW, ΔW) per target layer, C the projection of its alignment matrix (aligned − base)."""
    base_t = targets(base)
    with torch.no_grad():
        return {t.name: cosine(projection(ref.read() - base_t[t.name].read()), d)
                for t, ref, d in updates(model, aligned)}


def cos_threshold(cfg: Config, cosines: list[float]) -> float:
    """τ: the fixed threshold, or the N-th lowest cosine (-inf when N = 0)."""
    if cfg.select == "threshold":
        return cfg.threshold
    n = cfg.num_proj_layers or (max(1, round(cfg.proj_fraction * len(cosines))) if cfg.proj_fraction else 0)
    if n == 0 or not cosines:
        return -math.inf
    return sorted(cosines)[: n][-1]


class SafeLoRA(Defense):
    """Replace ΔW by its projection C·ΔW on the layers least aligned with the safety subspace."""

    name = "safelora"
    needs = ("aligned", "base")
    Config = Config

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        model = plain(model)
        aligned, base = ctx.reference("aligned"), ctx.reference("base")
        cosines = layer_cosines(model, aligned, base)
        tau = cos_threshold(self.cfg, list(cosines.values()))
        base_t = targets(base)
        with torch.no_grad():
            projected = []
            for t, ref, d in updates(model, aligned):
                if cosines[t.name] <= tau:
                    set_update(t, ref, projection(ref.read() - base_t[t.name].read()) @ d)
                    projected.append(t.name)
        vals = list(cosines.values())
        ctx.repair_metrics = {
            "projected_layers": len(projected), "layers": len(cosines),
            "cos_threshold": tau if math.isfinite(tau) else None,
            "min_cos": min(vals, default=None), "mean_cos": sum(vals) / len(vals) if vals else None,
            "projected": projected,
        }
        log.info("safelora: projected %d of %d layers (cos <= %.4g)", len(projected), len(cosines), tau)
        return model
