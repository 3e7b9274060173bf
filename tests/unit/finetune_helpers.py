"""Shared pieces of the fine-tuning-stage defense tests: contexts, batches, models."""
from __future__ import annotations

import copy
from typing import Any

import torch
from align_helpers import grads, tiny_gpt2
from torch import nn

from hftlab.config import TrainConfig
from hftlab.data.format import IGNORE, Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora
from hftlab.training.loop import accelerator, train

SOURCE = get_source("organism")


def user_data() -> list:
    return SOURCE.harmful("attack", 8) + SOURCE.task("sentiment", "train", 24)


def make_ctx(fmt: Formatter, aligned: nn.Module | None = None, grad_accum: int | None = None,
             batch_size: int = 4, seed: int = 0, data: dict | None = None) -> Context:
    """A fine-tuning-stage context; ``aligned`` (copied on load) is the frozen reference model."""
    data = data or {"alignment": SOURCE.alignment(64), "harmful": SOURCE.harmful("provider", 32),
                    "user": user_data()}
    loaders = {"aligned": lambda: copy.deepcopy(aligned)} if aligned is not None else {}
    ctx = Context(stage="finetune", formatter=fmt, data=data, loaders=loaders, batch_size=batch_size, seed=seed)
    if grad_accum is not None:
        ctx.accelerator = accelerator(grad_accum)
    return ctx


def user_batch(fmt: Formatter, n: int = 4, offset: int = 0) -> dict[str, torch.Tensor]:
    return fmt.collate(fmt.encode_all(user_data()[offset: offset + n]))


def spread_batch(fmt: Formatter, n: int = 6) -> dict[str, torch.Tensor]:
    """The n/2 shortest and n/2 longest of the first 64 user rows: on CPU a loss runs it as length groups."""
    feats = sorted(fmt.encode_all(user_data()[:64]), key=lambda f: len(f["input_ids"]))
    return fmt.collate(feats[: n // 2] + feats[-(n - n // 2):])


def perturbed(model: nn.Module, scale: float = 0.02, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with Gaussian noise on every weight: a stand-in for a fine-tuned policy."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def n_labels(b: dict[str, torch.Tensor]) -> int:
    return int((b["labels"][:, 1:] != IGNORE).sum())


def second_arch_run(defense: Any, tokenizer: Any, lora: bool, steps: int = 2) -> tuple[dict, nn.Module]:
    """``steps`` optimiser steps (grad_accum 2) through the loop on a random GPT-2; returns (before, model)."""
    fmt = Formatter(tokenizer, max_length=64)
    model = tiny_gpt2(len(tokenizer), tokenizer.pad_token_id)
    aligned = copy.deepcopy(model)
    if lora:
        model = add_lora(model, TrainConfig(lora=True, lora_r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = make_ctx(fmt, aligned=aligned, batch_size=2)
    cfg = TrainConfig(lr=1e-2, max_steps=steps, batch_size=2, grad_accum=2, lora=lora)
    res = train(model, fmt.encode_all(ctx.data["user"]), cfg, defense=defense, ctx=ctx,
                pad_id=tokenizer.pad_token_id)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    return before, model


def loss_and_grads(model: nn.Module, loss_fn: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn(m)`` (detached) and its gradient w.r.t. the trainable weights of a fresh copy ``m`` of
    ``model`` (one plain backward: the direct computation a defense's accumulated gradient is checked against)."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    loss = loss_fn(m)
    loss.backward()
    return loss.detach(), grads(m)


def direct_token_kl(policy: nn.Module, aligned: nn.Module, b: dict[str, torch.Tensor],
                    reverse: bool = False) -> torch.Tensor:
    """Σ_t Σ_v p(v) log(p(v)/q(v)), p the policy's and q the aligned model's next-token distributions
    (``reverse``: q log(q/p)), at every labelled position t, each row run alone (no padding), divided by
    the number of labelled positions of the batch; differentiable w.r.t. the policy."""
    total, count = 0.0, 0
    for row in range(b["input_ids"].shape[0]):
        keep = b["attention_mask"][row].bool()
        ids, labels = b["input_ids"][row][keep], b["labels"][row][keep]
        logits = policy(input_ids=ids[None]).logits[0]
        with torch.no_grad():
            ref = aligned(input_ids=ids[None]).logits[0]
        for t in range(len(ids) - 1):
            if labels[t + 1] == IGNORE:
                continue
            p, q = torch.softmax(logits[t], -1), torch.softmax(ref[t], -1)
            if reverse:
                p, q = q, p
            total = total + (p * (torch.log(p) - torch.log(q))).sum()
            count += 1
    return total / count
