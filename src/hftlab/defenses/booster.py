"""Booster: attenuate the harmful perturbation during alignment.

Paper: Huang, Hu, Ilhan, Tekin, Liu — "Booster: Tackling Harmful Fine-tuning for Large Language Models
via Attenuating Harmful Perturbation", ICLR 2025, arXiv 2409.01586.
Reference: git-disl/Booster ``trainer.py`` (``BoosterAlignmentTrainer.training_step``), checked against it;
defaults from ``script/alignment/smooth_align.sh`` (λ=5, α=0.1) and ``smooth_align_perturb.sh`` (ρ=5).

Objective min_w f(w) + λ·[h(w) − h(w − α·∇h(w)/‖∇h(w)‖)], f = alignment loss, h = harmful loss on a
fresh batch of the provider's harmful set each micro-step. First-order update (as the reference):

    g = ∇f(w) + λ·(∇h(w) − ∇h(w − α·∇h(w)/‖∇h(w)‖))

``perturb_aware=True`` is Booster+Vaccine (the reference's ``--perturb_aware True``): ∇f is taken under
Vaccine's attention-output perturbation of radius ρ.

Deviations:
- The two harmful gradients come from ``torch.autograd.grad`` (they never touch ``.grad``) and the
  λ-term is accumulated through the same ``backward`` as ∇f, as the linear surrogate
  ⟨stopgrad(λ·(∇h(w) − ∇h(w'))), w⟩: one ``accelerator.backward`` per micro-batch, so gradient
  accumulation, loss scaling and DDP all-reduce see the whole update. The reference zeroes ``.grad``
  between its passes (which drops earlier micro-batches' gradients under accumulation).
- The weights are restored exactly from a copy after the perturbed pass (the reference adds the
  step back, which rounds in bf16).
- The harmful batch is drawn from the provider's harmful set of ``data.harmful_n`` samples (the paper:
  5000). Its size is ``harmful_batch_size`` = 10, the size the reference hard-codes in
  ``get_harmful_dataloader`` whatever the training batch (its scripts train with 10 too); 0 takes the
  alignment micro-batch size instead (an earlier hftlab default; on the organism, whose
  alignment batch is 32, ``bench/alignment_defenses.py`` measures a step at 4.97x SFT's with 32
  harmful rows and 2.42x with 10). That set is the alignment prompts with harmful answers, as in the
  reference (rows 5001–9999 of its refusal file: ``refusal`` for f, ``response`` for h); on the hub
  source this holds with ``data.alignment_set=refusal``.
- α is a step in the space of the weights that alignment trains: the reference aligns a LoRA adapter
  (r=32, lora_alpha=4, B=0 at start), the organism's default alignment is full fine-tuning, so the same
  α=0.1 moves a ~1M-parameter model much further. Note: the reference's rule itself descends h through
  +λ∇h(w) (curvature term λα·Hĝ); on the organism this keeps the aligned model's harmful loss low.

On the organism (seeds 0/1/2, default protocol, harmful batch 10) the attack's HS is 0.0/7.0/82.5
against SFT's 73.8/70.8/45.0: seed 2's aligned model already partly complies (aligned HS 62.2). On the
previous organism (version 2, docs/organism.md) it partly complied on every seed (aligned HS 17.5/66.2/18.5;
with a harmful batch of 32: 85.2/85.0/83.2) and the attack's HS was above SFT's (89.8/98.8/83.2 vs
70.0/77.5/59.5); with a constant alignment lr far below (2.2/0.5/12.0 vs 43.5/37.5/41.5). Measured
there with the per-step diagnostics this file logs (seed 0, batch 32): h
stays at 0.12–0.17 per token through alignment (0.095 at the base model) with a cosine or a constant
lr alike. What differs is the first answer token, where refusal is decided: with the default cosine
decay the aligned model refuses 3 % of its own training prompts when generating (SFT: 100 %), with a
constant lr 100 %. The per-token mean loss hides that one-token decision, so the refusal loss and the
λ-term meet at a knife edge that the schedule tips.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ..models.introspect import attention_modules
from .base import Context, Defense, grads_of, linear_term, lm_loss, local_model, weights_moved
from .perturbation import EPS, global_norm, require, vaccine_backward


@dataclass
class Config:
    lam: float = field(default=5.0, metadata=bounds(0.0, None))  # λ, weight of the harmful-loss reduction
    alpha: float = field(default=0.1, metadata=bounds(0.0, None))  # α, step of the simulated harmful update
    perturb_aware: bool = False  # Booster+Vaccine: ∇f under Vaccine's perturbation
    rho: float = field(default=5.0, metadata=bounds(0.0, None))  # Vaccine's ρ when perturb_aware (paper: 5)
    harmful_batch_size: int = field(default=10, metadata=bounds(0, None))  # reference: 10; 0 = alignment batch

    def check(self) -> None:
        for key in ("lam", "alpha", "rho"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)} < 0; must be >= 0")


def harmful_directions(model: nn.Module, params: list[nn.Parameter], batch: dict[str, torch.Tensor],
                       alpha: float) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
    """(∇h(w), ∇h(w − α·∇h/‖∇h‖), diagnostics) on one harmful batch; ``params`` are left exactly as found.
    The diagnostics are h(w), h after the simulated step and ‖∇h(w)‖ (Booster minimises the drop)."""
    h = lm_loss(model, batch)
    g = grads_of(h, params)
    norm = global_norm(g)
    step = alpha / (norm + EPS)
    with weights_moved(params, (-(gi * step.to(gi.dtype)) for gi in g)):
        h_pert = lm_loss(model, batch)
        g_pert = grads_of(h_pert, params)
    return g, g_pert, {"harmful_loss": h.detach(), "harmful_loss_after_step": h_pert.detach(),
                       "harmful_grad_norm": norm}


class Booster(Defense):
    """Alignment that also minimises the harmful loss's drop under a simulated harmful step."""

    name = "booster"
    needs = ("harmful",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        require(ctx, "harmful", "booster")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.modules = attention_modules(model) if self.cfg.perturb_aware else []

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        cfg = self.cfg
        g, g_pert, diagnostics = harmful_directions(local_model(model), self.params,
                                                    ctx.next_batch("harmful", cfg.harmful_batch_size or None),
                                                    cfg.alpha)
        ctx.step_metrics.update(diagnostics)  # logged per step in losses.jsonl
        with torch.no_grad():
            for gi, gp in zip(g, g_pert):  # λ·(∇h(w) − ∇h(w')), in place to save memory
                gi.sub_(gp).mul_(cfg.lam)
        del g_pert
        if cfg.perturb_aware:  # ∇f under Vaccine's perturbation, the λ-term in the same backward
            return vaccine_backward(model, batch, ctx, self.modules, cfg.rho, extra=linear_term(self.params, g))
        loss = lm_loss(model, batch)
        ctx.backward(loss + linear_term(self.params, g))
        return loss.detach()

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        self.params, self.modules = [], []
