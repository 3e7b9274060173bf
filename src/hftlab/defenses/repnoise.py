"""RepNoise: push the representations of harmful text towards Gaussian noise during alignment.

Paper: Rosati, Wehner, Williams, Bartoszcze, Atanasov, Gonzales, Majumdar, Maple, Sajjad, Rudzicz —
"Representation Noising: A Defence Mechanism Against Harmful Finetuning", NeurIPS 2024, arXiv 2405.14577.
Reference: domenicrosati/representation-noising ``representation_noising/loss.py`` (``rep_noise_loss``,
``MMD_loss``), checked against it; defaults α=0.1, β=0.001 from git-disl/Booster
``script/alignment/repNoise.sh`` (the setting of the harmful fine-tuning benchmarks).

Per alignment micro-batch, with a fresh batch of the provider's harmful set:

    loss = CE(alignment batch) + β·MMD − α·log(H + 1)
    MMD  = mean over layers l of MMD_k(MLP-output_l on the harmful-response tokens, N(0, I) noise)
    H    = [CE(logits) + Σ_{i=0..L} CE(lm_head(final_norm(hidden_state_i)))] / (L + 1)

MMD_k is the reference's multi-kernel Gaussian MMD (5 kernels, bandwidth ×2, base bandwidth the mean
pairwise squared distance / 4, not differentiated); each sample is one flattened (tokens × hidden)
vector with non-response positions zeroed in both the activations and the noise. H is the harmful
response's cross-entropy at the output and, through the logit lens, at every hidden state (HF's
last hidden state is already normed; it is normed again, as in the reference).

Deviations:
- The reference pairs each harmful sample with the same prompt's refusal and masks the tokens where
  the two differ; here the two sets are paired too (the provider's harmful set has the alignment
  prompts), but the batches are drawn independently and the masks are the labelled (response) tokens
  of each batch (Booster's copy of RepNoise also samples them independently).
- The reference's masked CE ignores token id 0 and zeroes the logits outside the mask (so the first
  response token is scored against uniform logits); ours is HF's shifted CE on the labels.
- The logit-lens cross-entropies project only the labelled positions through the head (the
  reference projects every position and masks): same value, less compute.
- Pairwise distances use the Gram form ‖x‖² + ‖y‖² − 2x·y (the reference materialises a
  (2B × 2B × T·H) tensor); the same value up to rounding.
- The harmless and harmful parts are back-propagated separately (same gradient, half the peak
  activation memory).
- On CPU the harmful batch runs as length groups, like every loss here (same values, no padding compute).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..bounds import bounds
from ..data.format import IGNORE
from ..models.introspect import final_norm, mlp_modules, unwrap
from .base import Context, Defense, lm_loss, upcast
from .perturbation import outputs_by_group, require


@dataclass
class Config:
    alpha: float = field(default=0.1, metadata=bounds(0.0, None))  # α, weight of −log(harmful loss + 1)
    beta: float = field(default=0.001, metadata=bounds(0.0, None))  # β, weight of the MMD to noise
    kernels: int = field(default=5, metadata=bounds(1, 20))  # Gaussian kernels of the MMD (reference: 5)
    kernel_mul: float = field(default=2.0, metadata=bounds(1.0, None))  # bandwidth ratio between kernels

    def check(self) -> None:
        for key in ("alpha", "beta"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: {getattr(self, key)} < 0; must be >= 0")


def mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, mul: float = 2.0) -> torch.Tensor:
    """Multi-kernel Gaussian MMD between samples x (n, d) and y (n, d), as the reference's MMD_loss."""
    z = upcast(torch.cat([x, y]))
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)
    n = z.shape[0]
    base = d2.detach().sum() / (n * n - n) / mul ** (kernels // 2)
    k = sum(torch.exp(-d2 / (base * mul ** i)) for i in range(kernels))
    b = x.shape[0]
    return (k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b]).mean()


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return nn.functional.cross_entropy(upcast(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE, reduction=reduction)


def logit_lens_ce(model: nn.Module, hiddens: tuple[torch.Tensor, ...], labels: torch.Tensor,
                  reduction: str = "mean") -> list[torch.Tensor]:
    """Cross-entropy of the labels when each hidden state is read out by the final norm and the LM head.

    Only the labelled positions go through the head (the same mean as masking the full logits).
    """
    keep = labels[:, 1:] != IGNORE
    targets = labels[:, 1:][keep]
    norm, head = final_norm(model), model.get_output_embeddings()
    return [nn.functional.cross_entropy(upcast(head(norm(h[:, :-1][keep]))), targets, reduction=reduction)
            for h in hiddens]


def harmful_terms(model: nn.Module, batch: dict[str, torch.Tensor], kernels: int = 5,
                  mul: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(MMD term, H) on one harmful batch (the Gaussian noise uses the global RNG).

    The MLP outputs and the cross-entropy sums come from :func:`~hftlab.defenses.perturbation.outputs_by_group`
    (the batch's activations; the sums of the token cross-entropies, divided here by the batch's
    labelled-token count).
    """
    mlps = mlp_modules(model)
    labels = batch["labels"]

    def ce_sums_of(out: Any, labels: torch.Tensor) -> list[torch.Tensor]:  # the output CE, then each lens
        return [shifted_ce(out.logits, labels, "sum"), *logit_lens_ce(unwrap(model), out.hidden_states, labels, "sum")]

    activations, per_group = outputs_by_group(model, batch, mlps, ce_sums_of, output_hidden_states=True)
    ce_sums = per_group[0]
    for sums in per_group[1:]:
        ce_sums = [a + b for a, b in zip(ce_sums, sums)]
    mask = (labels != IGNORE).unsqueeze(-1)
    noise_term = 0.0
    for act in activations:
        hidden = act * mask
        noise = torch.randn_like(hidden) * mask
        noise_term = noise_term + mmd(hidden.flatten(1), noise.flatten(1), kernels, mul)
    noise_term = noise_term / len(mlps)
    n_labelled = (labels[:, 1:] != IGNORE).sum()
    n_hidden = len(ce_sums) - 1  # L + 1 hidden states; the output CE is the extra term
    return noise_term, sum(ce_sums) / n_labelled / n_hidden


class RepNoise(Defense):
    """Alignment CE + β·MMD(harmful activations, noise) − α·log(harmful loss + 1)."""

    name = "repnoise"
    needs = ("harmful",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        require(ctx, "harmful", "repnoise")
        mlp_modules(model)  # fail before training on a model whose blocks cannot be found
        final_norm(model)

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        cfg = self.cfg
        harmless = lm_loss(model, batch)
        ctx.backward(harmless)
        noise_term, harmful = harmful_terms(model, ctx.next_batch("harmful"), cfg.kernels, cfg.kernel_mul)
        adversarial = cfg.beta * noise_term - cfg.alpha * torch.log(harmful + 1.0)
        ctx.backward(adversarial)
        ctx.step_metrics.update(noise_mmd=noise_term.detach(), harmful_lens_loss=harmful.detach())  # losses.jsonl
        return harmless.detach() + adversarial.detach()
