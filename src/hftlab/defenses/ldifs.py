"""LDIFS: keep the hidden features of the user batch close to the frozen aligned model's.

Paper: Mukhoti et al., "Fine-tuning can cripple your foundation model; preserving features may be the
solution", arXiv 2308.13320.
Reference: omegafragger/ldifs_code, ``loss/ldifs.py`` (``LDIFSFinetune.forward``, ``CE_LDIFS``) and
``model/modeling.py`` (``ImageEncoderAugmented.get_features``: features after the embedding and after
groups of blocks).

Loss (the survey's summary): ℓ(w) + λ · mean over the batch of Σ_l ‖φ_l(w, x) − φ_l(w_aligned, x)‖², where
φ_l(·, x) are the hidden states of sequence x (every non-padding token) that the HF model returns: the
embedding output and each decoder layer's output (the last one after the final norm, as HF returns it).

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

from ..config import rng
from .base import Context, Defense, batch_pieces, label_count, upcast


@dataclass
class Config:
    lam: float = field(default=1e-4, metadata=rng(0.0))  # λ (the survey's summary: 1e-4)


def feature_distance(hidden: tuple[torch.Tensor, ...], ref_hidden: tuple[torch.Tensor, ...],
                     attention_mask: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Σ_l Σ_tokens ‖h_l − h_l^ref‖² (padding excluded) / ``rows`` (default: the batch's rows: the mean)."""
    mask = attention_mask.unsqueeze(-1).to(hidden[0].dtype)
    total = sum(((upcast(h) - upcast(r.detach())).pow(2) * mask).sum() for h, r in zip(hidden, ref_hidden))
    return total / (rows or attention_mask.shape[0])


class LDIFS(Defense):
    name = "ldifs"
    stages = ("finetune",)
    needs = ("aligned",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        ctx.reference("aligned")  # load before the first step

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        """On CPU the batch runs as its length groups (as ``lm_loss``): the same sums over the same tokens
        divided by the batch's label count and rows, without the padding compute."""
        ref_model = ctx.reference("aligned")
        pieces = batch_pieces(model, batch)
        kw = {"num_items_in_batch": label_count(batch)} if len(pieces) > 1 else {}
        rows = batch["input_ids"].shape[0]
        loss = torch.zeros((), device=batch["input_ids"].device)
        for piece in pieces:
            inputs = {"input_ids": piece["input_ids"], "attention_mask": piece["attention_mask"],
                      "output_hidden_states": True, "use_cache": False}
            out = model(**inputs, labels=piece["labels"], **kw)
            with torch.no_grad():
                ref = ref_model(**inputs)
            loss = loss + out.loss + self.cfg.lam * feature_distance(out.hidden_states, ref.hidden_states,
                                                                     piece["attention_mask"], rows)
        ctx.backward(loss)
        return loss.detach()
