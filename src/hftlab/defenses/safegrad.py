"""SafeGrad: gradient surgery between the user's task and an alignment objective during fine-tuning.

Paper: Yi et al., "Gradient Surgery for Safe LLM Fine-Tuning" (SafeGrad), arXiv 2508.07172.
Reference: none read. The authors' code (an anonymous review link in the paper) and the paper's method
section were not available to us, only its abstract; this file implements the mechanism the abstract
states, and the choices it leaves open are ours (listed as such below).

Per micro-batch: g_u = ∇ℓ_user(θ) on the user's batch and g_a = ∇ℓ_align(θ) on a batch of the provider's
alignment data, over the trainable weights taken as one vector. If ⟨g_u, g_a⟩ < 0 (conflict), the user
gradient is projected onto the normal plane of g_a: g_u ← g_u − (⟨g_u, g_a⟩ / ‖g_a‖²)·g_a, so a small
step along it no longer increases the alignment loss. The update is g_u + w·g_a (both objectives of the
paper's multi-objective framing; ``align_weight`` w = 0 keeps the projected user gradient only).
ℓ_align is, as in the abstract, a KL-divergence alignment loss toward the well-aligned model: per token,
KL(p_aligned ‖ p_θ) over the vocabulary at the labelled positions of the alignment batch, averaged over
them (``align_loss: sft`` uses the alignment batch's cross-entropy instead).

Choices the abstract leaves open (ours, to check against the paper's method section):
- the update g_u + w·g_a with w = 1, and the projection only on conflict (PCGrad's rule);
- the KL direction aligned ‖ policy (distillation's forward KL; :mod:`hftlab.defenses.kl` is the reverse);
- the alignment batch size (default: the fine-tuning batch size).
Implementation notes: with a fresh LoRA adapter the policy equals the aligned model at the first step, so
the KL gradient is zero and nothing is projected until the weights move; the combined vector is
accumulated through the loop's backward (a linear surrogate Σ⟨c, θ⟩, as Booster here), so gradient
accumulation and loss scaling see it; under DDP each process projects its own micro-batch's gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..bounds import bounds, one_of
from ..data.format import IGNORE
from .base import Context, Defense, grads_of, lm_loss, paired_mean, upcast


@dataclass
class Config:
    align_loss: str = field(default="kl", metadata=one_of("kl", "sft"))  # abstract: a KL alignment loss
    align_weight: float = field(default=1.0, metadata=bounds(0.0))  # w in g_u + w·g_a
    batch_size: int = field(default=0, metadata=bounds(0))  # alignment rows per micro-batch (0: fine-tuning's)


def forward_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over labelled (shifted) positions of KL(softmax(ref_logits) ‖ softmax(logits)) over the vocabulary."""
    mask = labels[:, 1:] != IGNORE
    logp = F.log_softmax(upcast(logits[:, :-1][mask]), dim=-1)
    ref_logp = F.log_softmax(upcast(ref_logits[:, :-1][mask]).detach(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum()


def kl_to_aligned(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean per-token KL(aligned ‖ policy) over the batch's labelled positions (length groups on CPU)."""
    return paired_mean(model, ref_model, batch, forward_kl)


def surgery(g_u: list[torch.Tensor], g_a: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(g_u projected onto the normal plane of g_a when ⟨g_u, g_a⟩ < 0, else g_u; the cosine before)."""
    dot = sum((u.double() * a.double()).sum() for u, a in zip(g_u, g_a))
    nu = torch.sqrt(sum(u.double().pow(2).sum() for u in g_u))
    na2 = sum(a.double().pow(2).sum() for a in g_a)
    cos = dot / (nu * torch.sqrt(na2)).clamp(min=1e-30)
    if dot < 0 and na2 > 0:
        coef = (dot / na2).item()
        g_u = [u - coef * a.to(u.dtype) for u, a in zip(g_u, g_a)]
    return g_u, cos


class SafeGrad(Defense):
    name = "safegrad"
    needs = ("alignment", "aligned")
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.cfg.align_loss == "kl":
            ctx.reference("aligned")  # load before the first step
        ctx.batches("alignment", self.cfg.batch_size or None)  # tokenise now, not inside the first step

    def align_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        if self.cfg.align_loss == "kl":
            return kl_to_aligned(model, ctx.reference("aligned"), batch)
        return lm_loss(model, batch)

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        loss = lm_loss(model, batch)
        g_u = grads_of(loss, self.params)
        ab = ctx.next_batch("alignment", self.cfg.batch_size or None)
        a_loss = self.align_loss(model, ab, ctx)
        g_a = grads_of(a_loss, self.params)
        g_u, cos = surgery(g_u, g_a)
        with torch.no_grad():
            combined = [u + self.cfg.align_weight * a for u, a in zip(g_u, g_a)]
        ctx.backward(sum((c * p).sum() for c, p in zip(combined, self.params)))  # its gradient: combined
        ctx.step_metrics.update({"align_loss": a_loss.detach(), "grad_cos": cos, "projected": (cos < 0).float()})
        return (loss + self.cfg.align_weight * a_loss).detach()
