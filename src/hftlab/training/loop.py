"""ONE training loop for every stage (organism pretraining, alignment, user fine-tuning).

Reads top to bottom: seed → data loader → optimiser + schedule → Accelerate → for each optimiser step:
``grad_accum`` micro-batches through ``defense.backward`` (the only place a method changes the
gradient), clip, step, ``defense.on_step_end``. Features:

- full fine-tuning or LoRA (the caller wraps the model, see ``models.loading.add_lora``);
- gradient accumulation (``grad_accum``) through ``accelerator.accumulate``;
- gradient clipping (``max_grad_norm``, 0 = off); warm-up + constant/linear/cosine schedule;
- bf16 when a GPU is present (``model.dtype=auto`` loads real models in bf16, the organism in fp32; no
  autocast needed); a warning when full weights train in bf16/fp16 (small AdamW updates are lost);
- DDP/FSDP/DeepSpeed when launched with ``accelerate launch`` (``batch_size`` is the global batch);
- a progress bar on stderr, and ``losses.jsonl`` (step, loss, lr, and the scalars the defense put in
  ``ctx.step_metrics``) in the stage folder; losses stay on the device and reach the host every
  ``LOG_EVERY`` steps (one sync, not one per step).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.format import collate
from ..defenses.base import PLAIN, Context, Defense, endless_batches
from ..runtime import accelerator  # also importable from here (tests and bench scripts use it)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0


LOG_EVERY = 10  # steps between host syncs for the loss (a sync per step stalls a GPU)


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimiser steps: ``max_steps`` if set, else epochs over the data at the effective batch."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(n_examples * cfg.epochs / (cfg.batch_size * cfg.grad_accum)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def warn_low_precision(params: Sequence[nn.Parameter], cfg: TrainConfig, desc: str) -> None:
    """Warn when full weights train in bf16/fp16: an AdamW step smaller than half a weight's rounding step
    is lost (on the organism in bf16, one step at lr 1e-5 changes 5 % of the weights; in fp32, all).
    LoRA adapters are fp32 (PEFT upcasts them), so LoRA on a bf16 model is not affected."""
    low = sorted({str(p.dtype).replace("torch.", "") for p in params} & {"bfloat16", "float16"})
    if low:
        log.warning("%s: %s trainable weights (lr %g): most AdamW updates are smaller than the weights' "
                    "rounding step and are lost; use model.dtype=float32 for full fine-tuning, or LoRA", desc,
                    "/".join(low), cfg.lr)


def train(
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    cfg: TrainConfig,
    *,
    defense: Defense | None = None,
    ctx: Context | None = None,
    seed: int = 0,
    desc: str = "train",
    log_path: Path | None = None,
    pad_id: int = 0,
) -> TrainResult:
    """Train ``model`` in place on tokenised ``features``; returns losses and timing."""
    defense = defense or PLAIN
    acc = accelerator(cfg.grad_accum)
    ctx = ctx or Context(stage=desc)
    ctx.accelerator, ctx.train_cfg, ctx.seed = acc, cfg, seed
    ctx.batch_size = ctx.batch_size or cfg.batch_size
    seed_everything(seed)
    steps = total_steps(len(features), cfg)
    ctx.total_steps, ctx.step = steps, 0
    model.train()
    defense.setup(model, ctx)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: no trainable parameters")
    warn_low_precision(params, cfg, desc)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.schedule]
    sched = get_scheduler(name, opt, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)
    model, opt, sched = acc.prepare(model, opt, sched)

    world = acc.num_processes
    per_device = max(1, cfg.batch_size // world)
    batches = endless_batches(features, per_device, partial(collate, pad_id=pad_id), seed, acc.process_index, world)
    result = TrainResult()
    log_file = open(log_path, "w") if log_path is not None and acc.is_main_process else None
    bar = tqdm(total=steps, desc=desc, disable=not acc.is_local_main_process, leave=False,
               dynamic_ncols=True, mininterval=1.0)
    start = time.time()
    # (step, loss, lr, defense scalars): tensors stay on the device until logged
    pending: list[tuple[int, torch.Tensor, float, dict[str, Any]]] = []

    def flush() -> None:
        """Bring pending losses to the host in one sync: check, log, show (every LOG_EVERY steps)."""
        if not pending:
            return
        # every step's loss then its defense scalars, in one tensor: one transfer to the host
        flat = iter(torch.stack([torch.as_tensor(v, device=acc.device).float().reshape(())
                                 for _, loss, _, extra in pending for v in (loss, *extra.values())]).cpu().tolist())
        for step_no, _, lr, extra in pending:
            value, scalars = next(flat), {k: next(flat) for k in extra}
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss is {value} at step {step_no}")
            result.losses.append(value)
            if log_file:
                log_file.write(json.dumps({"step": step_no, "loss": value, "lr": lr, **scalars}) + "\n")
        if log_file:
            log_file.flush()
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)
        pending.clear()

    try:
        for step in range(steps):
            step_loss = torch.zeros((), device=acc.device)
            for _ in range(cfg.grad_accum):
                cpu_batch = next(batches)
                result.tokens += int(cpu_batch["attention_mask"].sum())
                batch = {k: v.to(acc.device, non_blocking=True) for k, v in cpu_batch.items()}
                with acc.accumulate(model):
                    loss = defense.backward(model, batch, ctx)
                    step_loss += loss.detach() / cfg.grad_accum
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                ctx.micro_step += 1
            ctx.step = step + 1
            defense.on_step_end(model, ctx)
            pending.append((step + 1, step_loss, sched.get_last_lr()[0], dict(ctx.step_metrics)))
            ctx.step_metrics.clear()
            if len(pending) >= LOG_EVERY or step + 1 == steps:
                flush()
            bar.update(1)
    finally:
        bar.close()
        if log_file:
            log_file.close()
        defense.teardown(model, ctx)
    result.steps, result.seconds = steps, time.time() - start
    model.eval()
    return result
