"""RESTA: restore safety by adding a safety vector to the fine-tuned weights (task arithmetic).

Paper: Bhardwaj, Anh & Poria, "Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned
Language Models through Task Arithmetic", ACL 2024, arXiv 2402.11746.
Reference: declare-lab/resta — not available to this project's reference store; checked against the
paper's abstract and the survey's summary only.

w ← w_ft + γ·(w_aligned − w_base) for every parameter. Optional DARE on the fine-tuning delta first
(RESTA_d in the paper): each entry of w_ft − w_aligned is dropped with probability p and the survivors
are rescaled by 1/(1 − p).

Deviations:
- Safety vector: the paper subtracts an *unaligned* model obtained by fine-tuning the aligned model on
  harmful QA; here it is the pre-alignment base, which on the organism is exactly the model that complies
  before alignment taught refusal (the survey's formula).
- γ = 0.5 is chosen a priori (the survey: "γ tuned"); the paper's value could not be read here.
- DARE is off by default (``dare_drop: 0``), i.e. plain RESTA; its random mask is seeded by ctx.seed.
- A PEFT model is merged first; the vector is added to every parameter (task arithmetic), not only to
  the LoRA targets.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ._weights import plain
from .base import Context, Defense

log = logging.getLogger(__name__)


def dare(delta: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability p, rescale the rest by 1/(1 − p) (Yu et al. 2023)."""
    keep = torch.rand(delta.shape, generator=gen) >= p
    return delta * keep.to(delta.device, delta.dtype) / (1 - p)


@dataclass
class Config:
    gamma: float = field(default=0.5, metadata=bounds(0.0, 10.0))  # scale of the safety vector
    dare_drop: float = field(default=0.0, metadata=bounds(0.0, 0.99))  # DARE drop rate p (0 = off)


class RESTA(Defense):
    """Add γ·(w_aligned − w_base) to the fine-tuned model."""

    name = "resta"
    needs = ("aligned", "base")
    Config = Config

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        model = plain(model)
        aligned = dict(ctx.reference("aligned").named_parameters())
        base = dict(ctx.reference("base").named_parameters())
        gen = torch.Generator().manual_seed(ctx.seed)
        moved = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in aligned or name not in base:
                    raise ValueError(f"resta: '{name}' is missing from the aligned or base model")
                w_al = aligned[name].to(p.device, torch.float32)
                vec = w_al - base[name].to(p.device, torch.float32)
                ft = w_al + dare(p.float() - w_al, self.cfg.dare_drop, gen) if self.cfg.dare_drop else p.float()
                p.copy_((ft + self.cfg.gamma * vec).to(p.dtype))
                moved += int(torch.count_nonzero(vec))
        vec_norm = sum(float((aligned[n].float() - base[n].float()).norm() ** 2) for n in aligned) ** 0.5
        ctx.repair_metrics = {"gamma": self.cfg.gamma, "dare_drop": self.cfg.dare_drop,
                              "safety_vector_norm": vec_norm, "changed_weights": moved}
        log.info("resta: added %.3g x safety vector (norm %.4g)", self.cfg.gamma, vec_norm)
        return model
