"""Panacea: fine-tune so that an adaptive post-fine-tuning perturbation restores safety, then apply it.

Paper: Wang et al., "Panacea: Mitigating Harmful Fine-tuning for Large Language Models via Post-fine-tuning
Perturbation", arXiv 2501.18100.
Reference: w-yibo/Panacea @ d17b2db: ``trainer.py`` (``Panacea.training_step`` / ``step_eps``),
``train.py`` (the last ε is added to the trainable weights before saving) and
``script/finetune/panacea_gsm8k.sh`` (``eps_rho=1``, ``lamb=0.001``, ``bad_sample_num=1000``; the
harmful loader's batch is 10).

Each fine-tuning step, g = user loss, h = harmful loss on a batch of the provider's harmful set:
    ε = ρ·∇h(w) / ‖∇h(w)‖            (one global norm over the trainable weights: ‖ε‖ = ρ)
    gradient = ∇g(w) − λ·(∇h_c(w + ε) − ∇h(w)),   h_c = min(h, 5)
i.e. descend g(w) − λ·(h_c(w + ε) − h(w)): keep the task while making the harmful loss rise as much as
possible along ε. After the last step, that step's ε is added to the trainable weights: the served model
is w + ε, the "post-fine-tuning perturbation".

Where it acts: the optimisation needs the user's data and the trained parameters (the LoRA factors with
LoRA fine-tuning), which only the fine-tuning stage has, so it lives in ``backward`` and the perturbation is
added in ``teardown`` at the end of fine-tuning, exactly where the reference adds it. The paper files it
as a post-fine-tuning defense; the registry lists it there, with stage "finetune".

Deviations:
- The reference backpropagates an undefined ``clip_loss_h``; read as the clamped h (its evident intent).
- The λ-term enters as a surrogate loss g(w) + ⟨d, w⟩ with d = −λ·(∇h_c(w+ε) − ∇h(w)) held fixed, so
  gradient accumulation, DDP and clipping stay in the loop; h's gradients come from torch.autograd.grad
  on the unwrapped model (the reference overwrote ``.grad``). The resulting gradient is the same.
- w is restored from a copy after the perturbed pass (the reference subtracts ε: equal up to rounding).
- Fine-tuning hyper-parameters are the pipeline's (the reference: lr 2e-5, 20 epochs, LoRA).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from .base import Context, Defense, grads_of, linear_term, lm_loss, local_model, upcast, weights_moved


@dataclass
class Config:
    rho: float = field(default=1.0, metadata=bounds(0.0))  # ‖ε‖ (eps_rho)
    lam: float = field(default=0.001, metadata=bounds(0.0))  # weight of the harmful-loss increase (lamb)
    harmful_batch_size: int = field(default=10, metadata=bounds(1))
    clamp: float = field(default=5.0, metadata=bounds(0.0))  # h(w + ε) is clamped at this value


class Panacea(Defense):
    """Fine-tune against the perturbation ε = ρ·∇h/‖∇h‖, then serve w + ε."""

    name = "panacea"
    needs = ("harmful",)
    Config = Config

    def perturbation(self, model: nn.Module, params: list[nn.Parameter],
                     harmful: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(ε, d): ε = ρ·∇h/‖∇h‖ and d = −λ·(∇h_c(w + ε) − ∇h(w)); the weights are left as they were."""
        g0 = grads_of(lm_loss(model, harmful), params)
        norm = torch.sqrt(sum((upcast(g) ** 2).sum() for g in g0))
        eps = [self.cfg.rho * g / (norm + 1e-7) for g in g0]
        with weights_moved(params, eps):
            g1 = grads_of(lm_loss(model, harmful).clamp(max=self.cfg.clamp), params)
        return eps, [-self.cfg.lam * (a - b) for a, b in zip(g1, g0)]

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        eps, d = self.perturbation(local_model(model), params, ctx.next_batch("harmful", self.cfg.harmful_batch_size))
        loss = lm_loss(model, batch)
        ctx.backward(loss + linear_term(params, d))
        ctx.state["panacea_eps"] = [e.detach() for e in eps]
        return loss.detach()

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        """Serve w + ε: add the last step's perturbation to the trainable weights."""
        eps = ctx.state.pop("panacea_eps", None)
        if eps is None:
            return
        with torch.no_grad():
            for p, e in zip([p for p in model.parameters() if p.requires_grad], eps):
                p.add_(e)
