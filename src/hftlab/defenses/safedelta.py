"""Safe Delta: keep the fine-tuning updates whose second-order safety cost fits a budget, then compensate.

Paper: Lu, Liu, Wu, Chen, Zhang, Ong, Wang, Tang, "Safe Delta: Consistently Preserving Safety when
Fine-Tuning LLMs on Diverse Datasets", ICML 2025, arXiv 2505.12038.
Reference: ColinLu50/SafeDelta @ c30ff4a, ``llama2/safedelta/safedelta_runner.py``
(``SafeDeltaRunner.add_batch``, ``adjust_delta``, ``get_safe_data``) and ``llama2/run_safedelta.py``
(``run_safedelta``: 128 safety samples, ``percdamp=0.01``, ``blocksize=2048``; ``main``: ``scale=0.1``).

Per linear weight of the decoder (``(out, in)``, columns = input features), on safety data (harmful
prompts with safe answers) run through the *aligned* model:

- H = (2/N)·Σ x·xᵀ over the tokens' inputs x of the layer, dead columns (H_jj = 0) set to 1, damped by
  ``percdamp``·mean(diag H); U = the upper Cholesky factor of H⁻¹, so U_mm² = [H_F⁻¹]_mm with F the
  columns m.. (the OBS quantity when the later columns may compensate).
- Columns in blocks of ``blocksize``. In a block, with W the current weight (aligned + compensation so
  far) and δ = W_ft − W: the safety cost of keeping an entry is δ²/U_mm², its cost per unit of kept
  update 1/U_mm². Entries are taken in increasing 1/U_mm² (the most sensitive ``exclude`` fraction never),
  while the running sum of their costs stays within the budget ε = s · mean(1/U_mm²) · rows · blocksize /
  width² (width: the model's hidden size; for Llama-2-7B, width 4096 and blocksize 2048, this is the
  reference's ``tmp.mean() * s/2 * rows/4096``).
- Compensation, column by column (``sub_block`` columns at a time, as the reference): a kept entry takes
  W_ft, the others keep W; the change e_m = W_m − q_m is propagated to the later columns,
  W_k −= e_m · U_mk / U_mm (= e_m · [H_F⁻¹]_mk / [H_F⁻¹]_mm), so that the layer's output on the safety
  data stays near the aligned one.

The result: every decoder linear weight edited as above, every other parameter (embeddings, norms,
head) the aligned model's, as the reference returns the aligned model edited in place.

Deviations:
- The budget's width 4096 and block 2048 are Llama-2-7B's; here width = the model's hidden size and
  ``blocksize`` = width/2 by default, the same formula otherwise (the organism: width 128, blocks of 64).
- Ties in the sensitivity order are broken stably (the reference's ``argsort`` leaves them unspecified).
- Safety data: the refusal examples (harmful prompt → refusal) of the provider's alignment set, one
  template, batched with padding masked out; the reference samples 128 self-generated safe answers and
  rotates four system-prompt templates.
- Only weights that fine-tuning changed are processed: for an unchanged one δ = 0 everywhere, so the
  reference leaves it unchanged as well.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ._weights import Target, gram_sums, plain, refusal_batches, targets, updates
from .base import Context, Defense

log = logging.getLogger(__name__)


@dataclass
class Config:
    s: float = field(default=0.1, metadata=bounds(0.0, None))  # safety budget scale (reference main: 0.1)
    calib_n: int = field(default=128, metadata=bounds(1))  # safety samples (nsamples)
    percdamp: float = field(default=0.01, metadata=bounds(0.0, 1.0))  # dampening of H, × mean(diag H)
    exclude: float = field(default=0.15, metadata=bounds(0.0, 1.0))  # most sensitive fraction never kept
    blocksize: int = field(default=0, metadata=bounds(0))  # columns per block; 0: hidden size / 2
    sub_block: int = field(default=4, metadata=bounds(1))  # columns updated together (reference: 4)
    batch_size: int = field(default=8, metadata=bounds(1))  # calibration batch; does not change H


def input_grams(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict[str, torch.Tensor]],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """H = (2/N)·Σ x·xᵀ of each module's input over the non-padding tokens, N = sequences."""
    n_seq = sum(b["input_ids"].shape[0] for b in batches)
    sums = gram_sums(model, modules, batches, dtype, answers_only=False)
    return {n: 2.0 * s / max(n_seq, 1) for n, s in sums.items()}


def inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """U, upper Cholesky factor of (H + damp·I)⁻¹, dead columns (H_jj = 0) given H_jj = 1 first."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.mean(torch.diag(h))
    h = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h, upper=True)


def select(w: torch.Tensor, w_ft: torch.Tensor, d: torch.Tensor, budget_scale: float,
           exclude: float) -> torch.Tensor:
    """Kept entries of one block: cheapest 1/d² first (all but the ``exclude`` most sensitive), while the
    running sum of (W_ft − W)²/d² stays ≤ ``budget_scale`` · mean(1/d²)."""
    tmp = (torch.ones_like(w) / d.reshape(1, -1) ** 2).flatten()
    loss = ((w_ft - w) ** 2 / d.reshape(1, -1) ** 2).flatten()
    order = torch.argsort(tmp, stable=True)
    n_ex = int(exclude * tmp.numel())
    if n_ex:
        order = order[:-n_ex]
    kept = torch.cumsum(loss[order], 0) <= tmp.mean() * budget_scale
    mask = torch.zeros_like(loss, dtype=torch.bool)
    mask[order] = kept
    return mask.reshape(w.shape)


def safe_delta(w_al: torch.Tensor, w_ft: torch.Tensor, h: torch.Tensor, s: float, width: int, blocksize: int,
               percdamp: float = 0.01, exclude: float = 0.15, sub_block: int = 4
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, kept mask) of one ``(out, in)`` weight; see the module docstring."""
    w, w_ft = w_al.clone(), w_ft.to(w_al.dtype)
    u = inverse_cholesky(h.to(w.dtype), percdamp)
    rows, cols = w.shape
    kept = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        d = torch.diag(u)[i1:i2]
        mask = select(w[:, i1:i2], w_ft[:, i1:i2], d, s * rows * blocksize / width ** 2, exclude)
        kept[:, i1:i2] = mask
        for j1 in range(i1, i2, sub_block):
            j2 = min(j1 + sub_block, i2)
            cur = w[:, j1:j2]
            m = mask[:, j1 - i1:j2 - i1]
            q = torch.where(m, w_ft[:, j1:j2], cur)
            err = (cur - q) / torch.diag(u)[j1:j2].unsqueeze(0)
            w[:, j1:j2] = q
            w[:, j2:] -= err @ u[j1:j2, j2:]
    return w, kept


class SafeDelta(Defense):
    """Keep the updates within a second-order safety budget (aligned-model Hessian), then compensate."""

    name = "safedelta"
    needs = ("alignment", "aligned")
    Config = Config

    def _batches(self, model: nn.Module, ctx: Context) -> list[dict[str, torch.Tensor]]:
        return refusal_batches(model, ctx, self.cfg.calib_n, self.cfg.batch_size, self.name)

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        model = plain(model)
        aligned = ctx.reference("aligned")
        changed = {t.name: (t, ref, d) for t, ref, d in updates(model, aligned)}
        al_t = targets(aligned)
        dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        grams = input_grams(aligned, {n: al_t[n].module for n in changed}, self._batches(aligned, ctx), dtype)
        width = int(getattr(aligned.config, "hidden_size"))
        block = self.cfg.blocksize or max(1, width // 2)
        kept = total = 0
        with torch.no_grad():
            for name, (t, ref, _) in changed.items():
                new, mask = safe_delta(_weight(ref, dtype), _weight(t, dtype), grams[name], self.cfg.s, width,
                                       block, self.cfg.percdamp, self.cfg.exclude, self.cfg.sub_block)
                t.write(new)
                kept, total = kept + int(mask.sum()), total + mask.numel()
            reverted = _others_from(model, aligned)
        ctx.repair_metrics = {"kept": kept, "kept_fraction": kept / max(total, 1), "matrices": len(changed),
                                       "reverted_params": reverted, "width": width, "blocksize": block}
        log.info("safedelta: kept %d of %d updated weights in %d matrices (s=%g)", kept, total, len(changed),
                 self.cfg.s)
        return model


def _weight(t: Target, dtype: torch.dtype) -> torch.Tensor:
    """The ``(out, in)`` weight of a target in ``dtype`` (Target.read is float32 only)."""
    w = t.module.weight.detach()
    return (w.t() if t.transposed else w).to(dtype).clone()


def _others_from(model: nn.Module, aligned: nn.Module) -> int:
    """Copy every parameter outside the decoder's linear weights from ``aligned``; the number that differed."""
    linear = {id(t.module.weight) for t in targets(model).values()}
    ref = dict(aligned.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        if id(p) in linear or name not in ref:
            continue
        if not torch.equal(p.detach(), ref[name].detach().to(p.dtype)):
            p.copy_(ref[name].detach().to(p.dtype))
            n += 1
    return n
