"""EWC: an elastic penalty that keeps the weights important to alignment near their aligned values.

Paper: Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017
(arXiv 1612.00796), as the harmful fine-tuning papers use it as a fine-tuning-stage baseline (Vaccine,
arXiv 2402.01109; Lisa, arXiv 2405.18641).
Reference: git-disl/Vaccine (the same code is in git-disl/Lisa), ``trainer.py`` ``FITrainer`` (``init``,
``training_step``), ``train.py`` (the Fisher data: the first 2000 safe BeaverTails rows, the
``eval_dataset``) and ``script/EWC_finetune/sst2.sh`` (``lamb`` = 1e9, eval batch 5).

Loss: ℓ_user(θ) + λ · Σ_i F_i · (θ_i − θ*_i)², over the trainable weights θ, with θ* the trainable weights
when fine-tuning starts and F the diagonal empirical Fisher of the aligned model on alignment data,
computed once in ``setup`` as the reference does: the first ``fisher_samples`` alignment examples in
order, in batches of ``fisher_batch_size``, F = Σ_batches (∇ℓ_batch(θ*))² (the square of each batch's
mean-loss gradient, summed over batches, not averaged; no 1/2 before λ).

With LoRA (the pipeline's default fine-tuning) θ are the adapter's A and B matrices, as in the reference,
which penalises its LoRA modules' weights. A fresh adapter has B = 0, so the gradient, hence the Fisher,
of every A is zero: only B is held (by a Fisher that depends on the random A), A moves freely. The
reference fine-tunes the alignment stage's LoRA adapter instead ("EWC REUSE THE SAME LORA"), whose A and
B both have a Fisher: run ``align.lora=true finetune.continue_adapter=true`` for that workflow. With full
fine-tuning θ are all the weights (textbook EWC).

Deviations:
- The penalty's gradient 2λ·F·(θ − θ*) is added to ``.grad`` directly with multi-tensor ops (scaled by
  1/grad_accum like the losses ``ctx.backward`` back-propagates), not back-propagated per tensor.
- The reference leaves the last Fisher batch's gradient in ``.grad``, so its first step also descends
  that alignment batch; here the gradients are cleared after the Fisher pass.
- The Fisher data are the run's alignment set (the organism's: refusals, chat and task formats; the
  reference: BeaverTails prompts with safe answers).
- λ = 1e9 is the reference's value for Llama-2-7B in bf16 with 400 Fisher batches; the right scale
  depends on the model's gradient magnitudes and the number of batches (``tune:`` in the config file).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from .base import Context, Defense, grads_of, lm_loss, upcast

log = logging.getLogger(__name__)


@dataclass
class Config:
    lam: float = field(default=1e9, metadata=bounds(0.0))  # λ (script/EWC_finetune/*.sh: lamb=1e9)
    fisher_samples: int = field(default=2000, metadata=bounds(1))  # first N alignment rows (train.py: 2000)
    fisher_batch_size: int = field(default=5, metadata=bounds(1))  # per_device_eval_batch_size=5


def fisher_diagonal(model: nn.Module, params: list[nn.Parameter], batches: list[dict[str, torch.Tensor]]
                    ) -> list[torch.Tensor]:
    """Σ over ``batches`` of (∂ mean-loss / ∂p)² for each of ``params`` (the reference's empirical Fisher);
    ``.grad`` is left as found."""
    saved = [p.grad for p in params]
    fisher = [torch.zeros_like(upcast(p.detach())) for p in params]
    for b in batches:
        for f, g in zip(fisher, grads_of(lm_loss(model, b), params)):  # an unused p adds zeros
            f.add_(upcast(g).pow(2))
    for p, g in zip(params, saved):
        p.grad = g
    return fisher


class EWC(Defense):
    name = "ewc"
    needs = ("alignment",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        # by identity, not name: DDP/PEFT wrappers added after setup rename parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [upcast(p.detach()).clone() for p in self.params]
        examples = ctx.data.get("alignment", [])[: self.cfg.fisher_samples]
        if not examples:
            raise KeyError(f"ewc: stage '{ctx.stage}' has no 'alignment' data for the Fisher")
        feats = ctx.formatter.encode_all(examples)
        bs = self.cfg.fisher_batch_size
        batches = [{k: v.to(ctx.device) for k, v in ctx.formatter.collate(feats[i: i + bs]).items()}
                   for i in range(0, len(feats), bs)]
        self.fisher = fisher_diagonal(model, self.params, batches)
        total = float(sum(f.sum() for f in self.fisher))
        zero = sum(int((f == 0).all()) for f in self.fisher)
        log.info("ewc: Fisher over %d trainable tensors from %d batches of alignment data: sum %.4g, "
                 "%d tensors all zero", len(self.params), len(batches), total, zero)

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        loss = lm_loss(model, batch)
        ctx.backward(loss)
        lam = self.cfg.lam
        if lam == 0:
            return loss.detach()
        accum = getattr(ctx.accelerator, "gradient_accumulation_steps", 1) if ctx.accelerator else 1
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diffs = torch._foreach_sub([upcast(p.detach()) for p in self.params], self.anchor)
            step = torch._foreach_mul(diffs, self.fisher)
            torch._foreach_add_([p.grad for p in self.params], [s.to(p.grad.dtype) for s, p in
                                                                zip(step, self.params)], alpha=2 * lam / accum)
            reg = lam * sum((f * d.pow(2)).sum() for f, d in zip(self.fisher, diffs))
        ctx.step_metrics["ewc_penalty"] = reg
        return loss.detach() + reg.to(loss.dtype)
