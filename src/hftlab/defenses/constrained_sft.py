"""Constrained SFT: the token-wise constrained fine-tuning objective against the frozen aligned model.

Paper: Qi et al., "Safety Alignment Should Be Made More Than Just a Few Tokens Deep", arXiv 2406.05946
(Section 4, Eq. 3; Appendix D.2 for the gradient).
Reference: Unispac/shallow-vs-deep-alignment, ``finetuning_buckets/trainer/trainer.py``
``ConstrainedSFTTrainer.get_beta_list`` / ``soft_sft_loss`` / ``get_batch_logps`` and the README's
fine-tuning-attack command (β=0.1, bias_factor=20, first_token_bias_factor=5, bias_length=5).

Objective (per response token t of a response, Δ_t = log π_w(y_t|·) − log π_aligned(y_t|·)):
    (2/β_t) · log(1 + exp(−β_t·Δ_t))  — a DPO-like sigmoid-weighted log-ratio,
with β_t = β·first_token_bias_factor for the first response token, β·bias_factor for tokens 2…bias_length
and β afterwards. As in the reference, the loss is written in its numerically stable, gradient-identical
form −w_t·log π_w(y_t) with the weight w_t = max(2·(1 − σ(β_t·Δ_t)), 1e-3) detached, averaged over all
response tokens of the batch. At the start (π_w = π_aligned) every w_t = 1: plain SFT.

Deviations:
- Reference log-probs are computed on the fly by the frozen aligned model (the reference precomputes
  them once over the dataset with the same frozen model: identical values, one extra no-grad forward
  per step instead of per sample).
- The optimiser is the loop's AdamW (β1 = 0.9); the reference's fine-tuning-attack runs use β1 = 0.5.
- No safety-augmentation or utility-anchor data (separate options of the reference trainer, off in its
  constrained fine-tuning runs).
- On CPU the batch runs as its length groups, like every loss here (same values up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..bounds import bounds
from ..data.format import IGNORE
from .base import Context, Defense, label_count, paired_logits, upcast

MIN_WEIGHT = 1e-3  # the reference clamps the detached token weight from below


@dataclass
class Config:
    beta: float = field(default=0.1, metadata=bounds(1e-8))  # base β (README: --beta=0.1)
    bias_factor: float = field(default=20.0, metadata=bounds(0.0))  # β·20 on response tokens 2..bias_length
    first_token_bias_factor: float = field(default=5.0, metadata=bounds(0.0))  # β·5 on the first token
    bias_length: int = field(default=5, metadata=bounds(0))  # how many leading tokens get the larger β


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-prob of the next label (shifted) and the mask of labelled positions."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    logp = -F.cross_entropy(upcast(logits[:, :-1].flatten(0, 1)), labels.flatten(), ignore_index=IGNORE,
                            reduction="none").view_as(labels)
    return logp, mask


def token_betas(mask: torch.Tensor, cfg: Config) -> torch.Tensor:
    """β_t for every labelled position: t = its index among the row's labelled tokens."""
    pos = mask.long().cumsum(dim=1) - 1
    beta = torch.full(mask.shape, cfg.beta, device=mask.device)
    if cfg.bias_length > 0:
        beta[pos < cfg.bias_length] = cfg.beta * cfg.bias_factor
        beta[pos == 0] = cfg.beta * cfg.first_token_bias_factor
    return beta


def constrained_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                     cfg: Config, count: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's ``soft_sft_loss`` averaged over the batch's response tokens."""
    logp, mask = token_logps(logits, labels)
    with torch.no_grad():
        ref_logp, _ = token_logps(ref_logits, labels)
        beta = token_betas(mask, cfg)
        weight = (2 * (1 - torch.sigmoid(beta * (logp - ref_logp)))).clamp(min=MIN_WEIGHT)
    total = -(weight * logp)[mask].sum()
    return total / (count if count is not None else mask.sum())  # default: the mean over response tokens


class ConstrainedSFT(Defense):
    name = "constrained-sft"
    needs = ("aligned",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        ctx.reference("aligned")  # load before the first step

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        """The sum over the batch's response tokens divided by the batch's count (``paired_logits`` may
        yield the batch in length groups)."""
        count = label_count(batch)
        loss = torch.zeros((), device=batch["input_ids"].device)
        for logits, ref_logits, labels in paired_logits(model, ctx.reference("aligned"), batch):
            loss = loss + constrained_loss(logits, ref_logits, labels, self.cfg, count)
        ctx.backward(loss)
        return loss.detach()
