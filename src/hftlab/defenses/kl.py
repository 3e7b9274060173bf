"""KL regulariser: keep the fine-tuned model's next-token distributions on alignment data close to the
frozen aligned model's.

Paper: the KL baseline of the harmful fine-tuning papers (Huang et al., Vaccine, arXiv 2402.01109, and
the same group's later baselines), a knowledge-distillation style penalty toward the aligned model.
Reference: git-disl/Vaccine, ``trainer.py`` ``KLTrainer`` (``init``, ``training_step``) and
``script/KL_finetune/sst2.sh`` (``lamb`` = 0.1).

Loss per micro-batch: ℓ_user(θ) + λ · mean over the labelled (response) positions t of an alignment batch
of KL(p_θ(·|x_<t) ‖ p_aligned(·|x_<t)) = Σ_v p_θ(v) (log p_θ(v) − log p_aligned(v)), the reverse KL from
the policy to the frozen aligned reference; each micro-batch draws its own alignment batch of
``batch_size`` rows (0: the fine-tuning batch size). At the start (LoRA B = 0) the policy is the aligned
model and the term is zero.

Deviations (the reference's term differs in three ways; this follows the method's definition):
- The reference computes the term on the user's own batch; here on a batch of the provider's alignment
  data, so that the penalty keeps the aligned behaviour on alignment prompts (the harmful rows of the
  user's batch would otherwise anchor the harmful answers to the aligned model's, which is also a pull
  toward refusal; ``data: user`` reproduces the reference's choice of rows).
- The reference calls ``KLDivLoss(log_softmax(student, dim=1), softmax(teacher, dim=1))`` on [batch,
  sequence, vocabulary] logits: the softmax runs over sequence positions, not the vocabulary, the
  direction is KL(teacher ‖ student), padding positions count and the sum is divided by the number of
  rows. Here: per-token distributions over the vocabulary, KL(policy ‖ aligned), labelled positions
  only, averaged over them.
- The reference's teacher is the model's weights when fine-tuning starts (the aligned model with a new
  LoRA adapter, i.e. the aligned model); here the frozen aligned model itself (the same function).
- On CPU each batch runs as its length groups, like every loss here (same values up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..bounds import bounds, one_of
from ..data.format import IGNORE
from .base import Context, Defense, lm_loss, paired_mean, upcast


@dataclass
class Config:
    lam: float = field(default=0.1, metadata=bounds(0.0))  # λ (script/KL_finetune/*.sh: lamb=0.1)
    batch_size: int = field(default=0, metadata=bounds(0))  # alignment rows per micro-batch (0: fine-tuning's)
    data: str = field(default="alignment", metadata=one_of("alignment", "user"))  # rows the KL is taken on


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over labelled (shifted) positions of KL(softmax(logits) ‖ softmax(ref_logits)) over the vocabulary."""
    mask = labels[:, 1:] != IGNORE
    logp = F.log_softmax(upcast(logits[:, :-1][mask]), dim=-1)
    ref_logp = F.log_softmax(upcast(ref_logits[:, :-1][mask]).detach(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum()


def kl_term(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean per-token KL(policy ‖ aligned) over the batch's labelled positions (length groups on CPU)."""
    return paired_mean(model, ref_model, batch, token_kl)


class KL(Defense):
    name = "kl"
    needs = ("alignment", "aligned")
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        ctx.reference("aligned")  # load before the first step
        if self.cfg.data == "alignment":
            ctx.batches("alignment", self.cfg.batch_size or None)  # tokenise now, not inside the first step

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        loss = lm_loss(model, batch)
        ctx.backward(loss)
        if self.cfg.lam == 0:
            return loss.detach()
        kb = ctx.next_batch("alignment", self.cfg.batch_size or None) if self.cfg.data == "alignment" else batch
        kl = kl_term(model, ctx.reference("aligned"), kb)
        ctx.backward(self.cfg.lam * kl)
        ctx.step_metrics["kl"] = kl.detach()
        return loss.detach() + self.cfg.lam * kl.detach().to(loss.dtype)
