"""NLSR: restore the safety-critical neurons of the layers whose fine-tuning drifted from a safety reference.

Paper: Yi, Zheng, Wang, de Melo, Wang, He, "NLSR: Neuron-Level Safety Realignment of Large Language Models
Against Harmful Fine-Tuning", AAAI 2025, arXiv 2412.12497.
Reference: xinykou/assessing_safety_realign @ b5ce723 (the code of xinykou/NLSR): ``weak_to_strong``
``expo-lora.py`` (the reference model), ``prune_regions/model_wrapper_low.py`` (``make_low_rank``),
``prune_regions/sparsity_ratio_low.py`` (the masks), ``safe_lora/inner.py``
(``Lora_inner_Wrapper.adaptive_identify_unsafe_region``, ``Adaptive_Search_Operation``, ``layer_passing``)
and ``scripts/ours/.../expo-adaptive_mask_replace-realign.sh`` / ``low_rank_prune.sh`` (``sparsity_ratio=0.8``,
``prune_rate=0.5``, ``epsilon=0.2``, EXPO ``alpha=0.9``, 2000 safety samples).

1. Safety reference model (pre-amplification, EXPO): θ_ref = θ_aligned + α(θ_aligned − θ_base), every
   parameter. ΔW_ref = W_ref − W_aligned per linear weight.
2. Safety-critical neurons (low-rank, per linear weight the fine-tuning changed): X = the weight's inputs
   in the reference model over the answer tokens of safety data (harmful prompt → refusal); score =
   X·ΔW_refᵀ; V = its top r right singular vectors, r = int(min(out, in)·``sparsity``); Ŵ = V·Vᵀ·ΔW_ref.
   The mask M holds the entries with |Ŵ| above the ``sparsity`` quantile of |Ŵ| (the top 20% by default).
3. Per layer, the similarity of the fine-tuned update to the reference on those neurons:
   s = cos(M⊙ΔW_ft, M⊙ΔW_ref), ΔW_ft = W_ft − W_aligned.
4. Adaptive layer selection: rank the layers by s; the least similar gets u = 1, the most similar u = 0
   (linear in the rank); p = (``prune_rate`` − ε) + 2ε·u, clipped to [0, 1]; a layer is restored with
   probability p (Bernoulli, seeded by the run seed).
5. Restoration (transplant): on a restored layer W ← W_ft⊙(1 − M) + W_ref⊙M.

Deviations:
- Weight space, not LoRA factors. The reference's fine-tuned and reference models are two LoRAs on the
  same model and it masks, compares and transplants the factors A and B; here the aligned model is not a
  LoRA (the organism is aligned by full fine-tuning), so the same steps act on the updates ΔW. The EXPO
  step follows the paper (1 + α on the alignment update); the reference's script scales each LoRA factor
  by 2α, i.e. the update by (2α)².
- The pre-alignment (weak) model of EXPO is the base model; the reference extrapolates from its SFT
  model towards its DPO model.
- Layer order: the reference code gives the *most* similar layers the highest probability, against its
  own comment and the paper (restore the layers whose safety neurons drifted); this follows the paper.
  With a single layer u = 1/2.
- The low-rank step uses one pass of the reference model (the reference projects the layers one after the
  other, recording each layer's inputs after the earlier ones were projected) and the exact top singular
  vectors (via the eigenvectors of ΔW_ref·XᵀX·ΔW_refᵀ) instead of ``svd_lowrank``'s randomised ones.
- When the quantile is 0, the reference adds random zero entries to the mask; here M is the strictly
  larger entries only.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ._weights import Target, gram_sums, plain, refusal_batches, targets, updates
from .base import Context, Defense

log = logging.getLogger(__name__)


@dataclass
class Config:
    alpha: float = field(default=0.9, metadata=bounds(0.0, None))  # EXPO pre-amplification
    sparsity: float = field(default=0.8, metadata=bounds(0.0, 1.0))  # rank kept / mask quantile (top 1 − s)
    prune_rate: float = field(default=0.5, metadata=bounds(0.0, 1.0))  # mean restore probability
    epsilon: float = field(default=0.2, metadata=bounds(0.0, 0.5))  # probability spread over the ranking
    calib_n: int = field(default=2000, metadata=bounds(1))  # safety samples
    batch_size: int = field(default=16, metadata=bounds(1))  # calibration batch; does not change the masks


def expo(aligned: nn.Module, base: nn.Module, alpha: float) -> nn.Module:
    """θ_aligned + α(θ_aligned − θ_base) for every floating parameter (a new model)."""
    ref = copy.deepcopy(aligned)
    b = dict(base.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.is_floating_point():
                p.add_(alpha * (p - b[name].to(p.dtype)))
    return ref


def safety_mask(delta_ref: torch.Tensor, gram: torch.Tensor, sparsity: float) -> torch.Tensor:
    """M: |V·Vᵀ·ΔW_ref| above its ``sparsity`` quantile, V the top int(min(out, in)·sparsity) right
    singular vectors of X·ΔW_refᵀ (eigenvectors of ΔW_ref·XᵀX·ΔW_refᵀ)."""
    r = int(min(delta_ref.shape) * sparsity)
    if r == 0:
        proj = torch.zeros_like(delta_ref)
    else:
        m = delta_ref @ gram @ delta_ref.T
        _, vecs = torch.linalg.eigh((m + m.T) / 2)  # ascending eigenvalues
        v = vecs[:, -r:]
        proj = v @ (v.T @ delta_ref)
    metric = proj.abs().flatten()
    thresh = torch.sort(metric).values[min(int(metric.numel() * sparsity), metric.numel() - 1)]
    return proj.abs() > thresh


def masked_cosine(mask: torch.Tensor, delta_ft: torch.Tensor, delta_ref: torch.Tensor) -> float:
    """cos(M⊙ΔW_ft, M⊙ΔW_ref) (0 when either is zero)."""
    a, b = (delta_ft * mask).flatten(), (delta_ref * mask).flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def restore_probabilities(sims: list[float], prune_rate: float, epsilon: float) -> torch.Tensor:
    """p_i = (prune_rate − ε) + 2ε·u_i, u = 1 for the least similar layer, 0 for the most (by rank)."""
    n = len(sims)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    order = torch.argsort(torch.tensor(sims, dtype=torch.float64), stable=True)  # ascending similarity
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = torch.arange(n, dtype=torch.float64)  # 0 = least similar
    u = 1 - rank / (n - 1) if n > 1 else torch.full((1,), 0.5, dtype=torch.float64)
    return ((prune_rate - epsilon) + 2 * epsilon * u).clamp(0, 1)


class NLSR(Defense):
    """Transplant the reference model's safety-critical neurons into the layers that drifted from it."""

    name = "nlsr"
    needs = ("alignment", "aligned", "base")
    Config = Config

    def _batches(self, model: nn.Module, ctx: Context) -> list[dict[str, torch.Tensor]]:
        return refusal_batches(model, ctx, self.cfg.calib_n, self.cfg.batch_size, self.name)

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        model = plain(model)
        aligned = ctx.reference("aligned")
        dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        ref = expo(aligned, ctx.reference("base"), self.cfg.alpha)
        ref_t = targets(ref)
        changed = [t for t, _, _ in updates(model, aligned)]
        # Xᵀ·X of each module's input over the answer tokens of the safety data
        grams = gram_sums(ref, {t.name: ref_t[t.name].module for t in changed}, self._batches(ref, ctx), dtype,
                          answers_only=True)
        al_t = targets(aligned)
        layers: dict[str, tuple[Target, torch.Tensor, float]] = {}
        with torch.no_grad():
            for t in changed:
                w_al, w_ref = _weight(al_t[t.name], dtype), _weight(ref_t[t.name], dtype)
                d_ref = w_ref - w_al
                mask = safety_mask(d_ref, grams[t.name], self.cfg.sparsity)
                layers[t.name] = (t, mask, masked_cosine(mask, _weight(t, dtype) - w_al, d_ref))
            sims = [s for _, _, s in layers.values()]
            probs = restore_probabilities(sims, self.cfg.prune_rate, self.cfg.epsilon)
            draw = torch.bernoulli(probs, generator=torch.Generator().manual_seed(ctx.seed))
            restored = []
            for (name, (t, mask, _)), hit in zip(layers.items(), draw.tolist()):
                if hit:
                    w = _weight(t, dtype)
                    t.write(torch.where(mask, _weight(ref_t[name], dtype), w))
                    restored.append(name)
        n_mask = sum(int(m.sum()) for _, m, _ in layers.values())
        ctx.repair_metrics = {
            "restored_layers": len(restored), "layers": len(layers), "restored": restored,
            "mask_fraction": n_mask / max(sum(m.numel() for _, m, _ in layers.values()), 1),
            "min_sim": min(sims, default=None), "mean_sim": sum(sims) / len(sims) if sims else None,
        }
        log.info("nlsr: restored the safety neurons of %d of %d layers", len(restored), len(layers))
        return model


def _weight(t: Target, dtype: torch.dtype) -> torch.Tensor:
    """The ``(out, in)`` weight of a target in ``dtype``."""
    w = t.module.weight.detach()
    return (w.t() if t.transposed else w).to(dtype).clone()
