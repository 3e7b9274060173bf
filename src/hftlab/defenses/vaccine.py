"""Vaccine: perturbation-aware alignment.

Paper: Huang, Hu, Liu — "Vaccine: Perturbation-aware Alignment for Large Language Models against
Harmful Fine-tuning Attack", NeurIPS 2024, arXiv 2402.01109.
Reference: git-disl/Vaccine ``trainer.py`` (``VaccineTrainer.training_step``, ``pre_first_step``,
``after_first_step``, ``pre_second_step``), checked against it.

Per alignment micro-batch: pass 1 takes g_l = ∂f/∂(output of every attention block l); the
perturbation e_l = ρ·g_l/‖g‖ has ONE global norm over all layers; pass 2 adds e_l to each
attention output (forward hooks) and only the perturbed loss's gradient is accumulated.
Works with full fine-tuning and LoRA, gradient accumulation, and any HF decoder (attention blocks
found by type).

The perturbation's scale depends on the batch. ρ is one norm over the whole micro-batch, so each
example is perturbed by about ρ/√B: the reference's ρ = 2 was set at B = 5; at the organism's B = 32
each example gets ~2.5× less. ``rho_batch`` = B_ref reads ρ as meant at B_ref rows and scales it by
√(B/B_ref) (``perturbation.effective_rho``), so ``rho_batch=5`` perturbs each example as the reference
does at any batch size; the default 0 keeps the reference's per-micro-batch ρ.

Deviations:
- Pass 1 uses ``torch.autograd.grad`` w.r.t. the attention outputs only (the reference runs a full
  ``backward`` that also computes weight gradients, then zeroes them): same e_l, cheaper, and it
  does not wipe the gradients that earlier micro-batches accumulated (the reference's
  ``model.zero_grad()`` between the passes does, under gradient accumulation).
- The shift is added as ``output + e`` (a constant, so gradients pass through unchanged) instead
  of the reference's in-place ``output[0].data = output[0] + e``: same forward and gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ..models.introspect import attention_modules
from .base import Context, Defense
from .perturbation import effective_rho, vaccine_backward


@dataclass
class Config:
    rho: float = field(default=2.0, metadata=bounds(0.0, None))  # perturbation radius ρ (paper: 2)
    rho_batch: int = field(default=0, metadata=bounds(0))  # 0: ρ per micro-batch (reference); B_ref: ρ·√(B/B_ref)

    def check(self) -> None:
        if self.rho < 0:
            raise ValueError(f"rho: {self.rho} < 0; the perturbation radius must be >= 0")


class Vaccine(Defense):
    """Alignment on the loss under the worst-case (radius ρ) perturbation of attention outputs."""

    name = "vaccine"
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.modules = attention_modules(model)

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        rho = effective_rho(self.cfg.rho, self.cfg.rho_batch, batch["input_ids"].shape[0])
        return vaccine_backward(model, batch, ctx, self.modules, rho)

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        self.modules = []
