"""Lisa: bi-state optimisation with a proximal term during user fine-tuning.

Paper: Huang et al., "Lazy Safety Alignment for Large Language Models against Harmful Fine-tuning"
(Lisa), arXiv 2405.18641.
Reference: git-disl/Lisa, ``trainer.py`` ``ADMMTrainer`` (``init``, ``check_mode``, ``switch_model``,
``training_step``) and ``script/finetune/lisa_poison_ratio.sh`` (ρ=1, 100 alignment / 900 fine-tuning
steps, guide data = the provider's alignment set).

Each optimiser step is either an *alignment* step (a batch of the provider's alignment set) or a
*fine-tuning* step (the user's batch, which is otherwise dropped during alignment steps, as in the
reference). The run starts in the alignment state.

The cycle is scale-free by default (``schedule="fraction"``): the run's optimiser steps are split into
``cycles`` cycles (paper: 20) and the first ``alignment_fraction`` (paper: 10 %) of each cycle is
alignment: step s is an alignment step iff (s·cycles mod total) < alignment_fraction·total. At the
paper's 20,000 steps that is exactly the reference's 100 alignment / 900 fine-tuning steps; on a run of
125 steps it is about one alignment step in eight, where the absolute 100/900 would spend the first
100 of 125 steps (80 %) on alignment data. ``schedule="steps"`` keeps the reference's absolute form:
after ``alignment_step`` steps switch to fine-tuning, after ``finetune_step`` steps back, and so on. At every switch the iterate of the state being
left is stored; each state then adds (ρ/2)·Σ‖w − w̃‖² over the trainable weights, where w̃ is the last
iterate of the OTHER state (the code's anchors; the README swaps them). The proximal term is off while
fewer than ``proximal_after`` (10 %) of all steps are done. Each state's loss is the mean token
cross-entropy of its own batch (never divided by the user batch's token count).

Deviations:
- The default cycle is the fraction form above (the paper's 10 % of 20 cycles at any run length); the
  reference's absolute 100/900 steps is ``schedule=steps``.
- States switch at optimiser-step boundaries; the reference counts micro-batches (``training_step``
  calls), which is the same when ``grad_accum`` = 1. The 10 % threshold is on optimiser steps too.
- The proximal term's gradient ρ·(w − w̃) is added to ``.grad`` directly with multi-tensor ops (scaled
  by 1/grad_accum like the losses ``ctx.backward`` back-propagates) instead of back-propagating
  (ρ/2)·‖w − w̃‖² per tensor: the same gradient, a handful of kernels instead of ~6 per tensor.
- One anchor copy (the weights at the last switch) instead of the reference's two per-state copies:
  only the other state's copy is ever read, and it is exactly that (half the memory, same maths).
- The guide data is the whole alignment set of the run (the reference takes the first 10 000 safe
  BeaverTails samples).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds, one_of
from .base import Context, Defense, lm_loss, upcast

log = logging.getLogger(__name__)

ALIGN, FINETUNE = "alignment", "finetune"


@dataclass
class Config:
    rho: float = field(default=1.0, metadata=bounds(0.0))  # proximal strength ρ (lisa_poison_ratio.sh: RHO=1)
    schedule: str = field(default="fraction", metadata=one_of("fraction", "steps"))
    cycles: int = field(default=20, metadata=bounds(1))  # fraction schedule: cycles per run (paper: 20)
    alignment_fraction: float = field(default=0.1, metadata=bounds(0.0, 1.0))  # of each cycle (paper: 10 %)
    alignment_step: int = field(default=100, metadata=bounds(0))  # steps schedule: per alignment state (0: never)
    finetune_step: int = field(default=900, metadata=bounds(1))  # steps schedule: per fine-tuning state
    proximal_after: float = field(default=0.1, metadata=bounds(0.0, 1.0))  # fraction of steps without proximal


def planned_state(step: int, total: int, cycles: int, alignment_fraction: float) -> str:
    """The fraction schedule: step ``step`` (0-based) of ``total`` is an alignment step iff it falls in
    the first ``alignment_fraction`` of its cycle, with ``cycles`` equal cycles over the run."""
    return ALIGN if (step * cycles) % max(total, 1) < alignment_fraction * max(total, 1) else FINETUNE


@torch.no_grad()
def sq_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ ‖a_i − b_i‖² over a list of tensors."""
    return upcast(torch.stack(torch._foreach_norm(torch._foreach_sub(a, b)))).pow(2).sum()


@torch.no_grad()
def add_proximal_grad(params: list[torch.Tensor], anchor: list[torch.Tensor], coef: float) -> None:
    """``p.grad += coef · (p − w̃)``: the gradient of (coef/2)·‖w − w̃‖², in a few multi-tensor kernels."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, anchor), alpha=coef)


class Lisa(Defense):
    name = "lisa"
    needs = ("alignment",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        cfg = self.cfg
        wants = cfg.alignment_fraction > 0 if cfg.schedule == "fraction" else cfg.alignment_step > 0
        use_align = wants and ctx.has("alignment")
        if wants and not use_align:
            log.warning("lisa: no alignment data in stage '%s'; only fine-tuning steps", ctx.stage)
        if use_align:
            ctx.batches("alignment")  # tokenise the guide data now, not inside the first step
        self.status = ALIGN if use_align else FINETUNE
        self._use_align = use_align
        self.clock = 0
        # by identity, not name: DDP/PEFT wrappers added after setup rename parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        # w̃ = the OTHER state's last iterate = the weights at the last switch (the start before any):
        # one copy serves both states, where the reference keeps two and reads only the other one
        self.anchor = self._snapshot()
        self.history: list[tuple[str, bool]] = []  # (state, proximal on) per optimiser step

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def proximal_on(self, ctx: Context) -> bool:
        """The reference's ``steps > 0.1 · total`` with ``steps`` = steps done before this one."""
        return self.cfg.rho > 0 and ctx.step > self.cfg.proximal_after * ctx.total_steps

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        if self.status == ALIGN:
            batch = ctx.next_batch("alignment")  # the user batch of this step is dropped (as the reference)
        loss = lm_loss(model, batch)  # mean over this batch's own labelled tokens
        ctx.backward(loss)
        loss = loss.detach()
        on = self.proximal_on(ctx)
        if on:  # + (ρ/2)·‖w − w̃‖², scaled for gradient accumulation like ctx.backward's losses
            accum = getattr(ctx.accelerator, "gradient_accumulation_steps", 1) if ctx.accelerator else 1
            add_proximal_grad(self.params, self.anchor, self.cfg.rho / accum)
            loss = loss + self.cfg.rho / 2 * sq_distance(self.params, self.anchor).to(loss.dtype)
        if len(self.history) == ctx.step:
            self.history.append((self.status, on))
        return loss

    def on_step_end(self, model: nn.Module, ctx: Context) -> None:
        self.clock += 1
        if self.cfg.schedule == "fraction":
            if self._use_align:
                nxt = planned_state(len(self.history), ctx.total_steps, self.cfg.cycles, self.cfg.alignment_fraction)
                if nxt != self.status:
                    self._switch(nxt)
        elif self.status == ALIGN and self.clock >= self.cfg.alignment_step:
            self._switch(FINETUNE)
        elif self.status == FINETUNE and self._use_align and self.clock >= self.cfg.finetune_step:
            self._switch(ALIGN)

    def _switch(self, to: str) -> None:
        """The iterate of the state being left becomes the anchor of the state entered."""
        left = self._snapshot()
        drift = float(sq_distance(left, self.anchor))
        log.debug("lisa: %s -> %s at step %d, squared drift since the last switch %.4g", self.status, to,
                 len(self.history), drift)
        self.anchor, self.status, self.clock = left, to, 0
