"""Antidote: one-shot Wanda pruning of the fine-tuned weights that harmful data activates.

Paper: Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large Language Models against
Harmful Fine-tuning", arXiv 2408.09600.
Reference: git-disl/Antidote @ 26e2ade: ``utils.py`` (``prune_wanda_outlier``, ``WrappedGPT``,
``find_layers``), ``train.py`` (the mask is applied as ``param.data *= 1 - bad_mask``) and
``script/finetune/antidote_poison_ratio.sh`` (``dense_ratio=0.1``, ``bad_sample_num=2000``).

Score S_ij = |W_ij|·‖X_j‖₂, X_j = input feature j of the weight over every token of the provider's
harmful samples (prompt + harmful answer, padding excluded). Per row, the reference sorts S (stable) and
keeps the int(cols·(1 − dense_ratio)) lowest; the rest, the top ``dense_ratio``, is set to zero.

Which weights (checked in the reference): the fine-tuning LoRA's own ``lora_A`` and ``lora_B`` matrices
(``find_layers`` keeps linears named "lora"; lora_A's input is the layer's input, lora_B's is lora_A's
output). The aligned weights are never touched. ``weights="adapter"`` (default) does exactly that, on the
PEFT model given or on the adapter the fine-tune stage saved next to the merged model; without an adapter
(or with ``weights="update"``) it prunes the merged update instead: S = |ΔW_ij|·‖X_j‖ with X the layer's
input, W ← W_aligned + ΔW ⊙ (1 − M).

Deviations:
- ``weights="update"`` (also the fallback when only a merged model exists) is not in the reference: B·A
  cannot be split back into the trained A and B, and Wanda on factors is not invariant to B·G, G⁻¹·A,
  so pruning the update is the same rule applied to the weights fine-tuning produced.
- Calibration runs batched (padding masked out) rather than one sample at a time; the norms are the same.
- ‖X_j‖² is summed over tokens rather than averaged per sample (the reference's running mean); a
  per-column constant, it does not change the per-row ranking.
- The reference's layer-wise outlier ratio code (OWL) is commented out there and absent here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds, one_of
from ._weights import finetuned_lora, plain, set_update, targets, updates
from .base import Context, Defense

log = logging.getLogger(__name__)


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """1 where a weight is pruned: per row, all but the int(cols·(1 − dense_ratio)) lowest |W|·‖X‖."""
    score = w.abs().float() * sq_norm.float().sqrt().unsqueeze(0)
    keep = int(w.shape[1] * (1 - dense_ratio))
    low = torch.sort(score, dim=-1, stable=True).indices[:, :keep]
    mask = torch.ones_like(score)
    mask.scatter_(1, low, 0.0)
    return mask


def input_sq_norms(model: nn.Module, modules: dict[str, nn.Module],
                   batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Σ over non-padding tokens of x_j² for the input of each module (one forward pass per batch)."""
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, inp: tuple, _out: object) -> None:
            x = inp[0].detach().float()[current["mask"]]
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"].bool()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


def factor_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The active adapters' lora_A / lora_B linears of a PEFT model, by module name."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, nn.Linear] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    out[f"{name}.lora_A.{adapter}"] = m.lora_A[adapter]
                    out[f"{name}.lora_B.{adapter}"] = m.lora_B[adapter]
    return out


@dataclass
class Config:
    dense_ratio: float = field(default=0.1, metadata=bounds(0.0, 1.0))  # fraction of each row zeroed
    weights: str = field(default="adapter", metadata=one_of("adapter", "update"))  # LoRA factors or ΔW
    calib_n: int = field(default=2000, metadata=bounds(1))  # harmful samples (bad_sample_num)
    batch_size: int = field(default=8, metadata=bounds(1))  # calibration batch; does not change the scores


class Antidote(Defense):
    """Zero, per row, the top ``dense_ratio`` of the fine-tuned weights by Wanda score on harmful data."""

    name = "antidote"
    needs = ("harmful", "aligned")
    Config = Config

    def _batches(self, model: nn.Module, ctx: Context) -> list[dict[str, torch.Tensor]]:
        if not ctx.has("harmful"):
            raise KeyError("antidote needs the provider's harmful set (ctx.data['harmful'])")
        data = ctx.data["harmful"][: self.cfg.calib_n]
        if len(data) < self.cfg.calib_n:
            log.info("antidote: %d harmful samples for calibration (calib_n=%d; raise data.harmful_n)",
                     len(data), self.cfg.calib_n)
        feats = ctx.formatter.encode_all(data, train_on_prompt=True)
        dev = next(model.parameters()).device
        bs = self.cfg.batch_size
        return [{k: v.to(dev) for k, v in ctx.formatter.collate(feats[i: i + bs]).items()}
                for i in range(0, len(feats), bs)]

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        lora = finetuned_lora(model, ctx) if self.cfg.weights == "adapter" else None
        if lora is not None:
            pruned, total, layers = self._prune_adapter(lora, ctx)
            model, mode = plain(lora), "adapter"
        else:
            if self.cfg.weights == "adapter":
                log.info("antidote: no LoRA adapter for this model: pruning its merged update instead")
            model, mode = plain(model), "update"
            pruned, total, layers = self._prune_update(model, ctx)
        ctx.repair_metrics = {"mode": mode, "pruned": pruned, "pruned_fraction": pruned / max(total, 1),
                              "matrices": layers,
                              "calib_samples": min(len(ctx.data["harmful"]), self.cfg.calib_n)}
        log.info("antidote (%s): zeroed %d of %d weights in %d matrices", mode, pruned, total, layers)
        return model

    def _prune_adapter(self, model: nn.Module, ctx: Context) -> tuple[int, int, int]:
        factors = factor_modules(model)
        norms = input_sq_norms(model, factors, self._batches(model, ctx))
        pruned = total = 0
        with torch.no_grad():
            for name, lin in factors.items():
                mask = wanda_mask(lin.weight, norms[name], self.cfg.dense_ratio)
                lin.weight.mul_((1 - mask).to(lin.weight.dtype))
                pruned, total = pruned + int(mask.sum()), total + mask.numel()
        return pruned, total, len(factors)

    def _prune_update(self, model: nn.Module, ctx: Context) -> tuple[int, int, int]:
        aligned = ctx.reference("aligned")
        changed = [t.name for t, _, _ in updates(model, aligned)]
        ts = targets(model)
        norms = input_sq_norms(model, {n: ts[n].module for n in changed}, self._batches(model, ctx))
        pruned = total = 0
        with torch.no_grad():
            for t, ref, delta in updates(model, aligned):
                mask = wanda_mask(delta, norms[t.name], self.cfg.dense_ratio)
                set_update(t, ref, delta * (1 - mask))
                pruned, total = pruned + int(mask.sum()), total + mask.numel()
        return pruned, total, len(changed)
