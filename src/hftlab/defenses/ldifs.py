"""LDIFS: keep the hidden features of the user batch close to the frozen aligned model's.

Paper: Mukhoti et al., "Fine-tuning can cripple your foundation model; preserving features may be the
solution", arXiv 2308.13320.
Reference: omegafragger/ldifs_code, ``loss/ldifs.py`` (``LDIFSFinetune.forward``, ``CE_LDIFS``) and
``model/modeling.py`` (``ImageEncoderAugmented.get_features``: features after the embedding and after
groups of blocks).

Loss (the survey's summary): ℓ(w) + λ · mean over the batch of Σ_l ‖φ_l(w, x) − φ_l(w_aligned, x)‖², where
φ_l(·, x) are the hidden states of sequence x (every non-padding token) that the HF model returns: the
embedding output and each decoder layer's output (the last one after the final norm, as HF returns it).

Two variants (``variant``):
- ``hidden`` (default): the loss above, the paper's idea (features of every depth) at the scale of the
  formula the harmful-fine-tuning survey states; its λ is searched on the organism by ``hftlab tune``.
- ``git-disl``: the LDIFS baseline of the git-disl repositories (Lisa, Booster, Vaccine; ``trainer.py``
  ``LDIFSTrainer``): forward hooks on each decoder layer's MLP block; per layer the term
  (ρ/2)·‖a_l(w) − a_l(w_aligned)‖² summed over the whole batch (not averaged over rows), and a layer
  whose term is ≥ ``drop`` (0.1; the reference's guard against overflow) is left out of that step's
  loss. ρ is ``lam``. Padding positions are excluded (the reference sums them too; here a length-grouped
  batch would otherwise change the loss).
The default stays ``hidden`` because the git-disl form's drop rule makes it a no-op wherever the MLP
outputs have moved by more than √(0.2/ρ) in norm, which depends on width and batch size (a 1M-parameter
model with 16 rows and a 7B one with 10 rows differ by orders of magnitude), so its paper value does not
carry over; both are calibrated by ``hftlab tune``.

Deviations:
- The reference (CLIP image encoders) normalises each feature map, averages the squared difference over
  positions and channels and over 5 depths, with α=10. Following the survey's summary, the distance here is the raw
  squared L2 distance summed over tokens, dimensions and all layers, with λ=1e-4.
- On CPU the batch runs as its length groups, like every loss here (same values up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds, one_of
from ..models.introspect import mlp_modules
from .base import Context, Defense, lm_loss, paired_outputs, upcast
from .perturbation import capture_outputs, local_model


@dataclass
class Config:
    lam: float = field(default=1e-4, metadata=bounds(0.0))  # λ (the survey's summary: 1e-4); ρ of git-disl
    variant: str = field(default="hidden", metadata=one_of("hidden", "git-disl"))
    drop: float = field(default=0.1, metadata=bounds(0.0))  # git-disl: a layer's term ≥ drop is left out


def mlp_terms(acts: list[torch.Tensor], ref_acts: list[torch.Tensor], attention_mask: torch.Tensor,
              rho: float) -> list[torch.Tensor]:
    """git-disl's per-layer terms (ρ/2)·Σ_rows,tokens ‖a_l − a_l^ref‖² (padding excluded)."""
    mask = attention_mask.unsqueeze(-1)
    return [rho / 2 * ((upcast(a) - upcast(r.detach())).pow(2) * mask.to(upcast(a).dtype)).sum()
            for a, r in zip(acts, ref_acts)]


def kept_sum(terms: list[torch.Tensor], drop: float) -> torch.Tensor:
    """Σ of the terms below ``drop`` (the reference's ``if proximal_loss < 0.1: loss += proximal_loss``)."""
    return sum((t for t in terms if float(t.detach()) < drop), torch.zeros((), dtype=terms[0].dtype, device=terms[0].device))


def feature_distance(hidden: tuple[torch.Tensor, ...], ref_hidden: tuple[torch.Tensor, ...],
                     attention_mask: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Σ_l Σ_tokens ‖h_l − h_l^ref‖² (padding excluded) / ``rows`` (default: the batch's rows: the mean)."""
    mask = attention_mask.unsqueeze(-1).to(hidden[0].dtype)
    total = sum(((upcast(h) - upcast(r.detach())).pow(2) * mask).sum() for h, r in zip(hidden, ref_hidden))
    return total / (rows or attention_mask.shape[0])


class LDIFS(Defense):
    name = "ldifs"
    needs = ("aligned",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        ctx.reference("aligned")  # load before the first step

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        """ℓ + λ·Σ_l ‖h_l − h_l^ref‖² / rows, summed over the parts :func:`paired_outputs` yields (each
        part's ``loss`` is its share of the batch's mean)."""
        ref_model = ctx.reference("aligned")
        if self.cfg.variant == "git-disl":
            return self._git_disl(model, ref_model, batch, ctx)
        rows = batch["input_ids"].shape[0]
        loss = torch.zeros((), device=batch["input_ids"].device)
        for out, ref, part in paired_outputs(model, ref_model, batch, with_loss=True, output_hidden_states=True):
            loss = loss + out.loss + self.cfg.lam * feature_distance(out.hidden_states, ref.hidden_states,
                                                                     part["attention_mask"], rows)
        ctx.backward(loss)
        return loss.detach()

    def _git_disl(self, model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor],
                  ctx: Context) -> torch.Tensor:
        """ℓ + Σ_l [(ρ/2)·‖a_l − a_l^ref‖² if < drop] over the MLP outputs, the whole batch at once (the
        drop rule needs each layer's whole-batch term)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        with capture_outputs(mlp_modules(local_model(model))) as acts:
            loss = lm_loss(model, batch, by_length=False)
        with torch.no_grad(), capture_outputs(mlp_modules(ref_model)) as ref_acts:
            ref_model(**inputs)
        n = len(acts)
        terms = mlp_terms([acts[i] for i in range(n)], [ref_acts[i] for i in range(n)], batch["attention_mask"],
                          self.cfg.lam)
        kept = kept_sum(terms, self.cfg.drop)
        ctx.step_metrics["ldifs_layers_kept"] = sum(float(t.detach()) < self.cfg.drop for t in terms)
        loss = loss + kept.to(loss.dtype)
        ctx.backward(loss)
        return loss.detach()
