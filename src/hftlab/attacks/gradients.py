"""Per-sample loss gradients of a causal LM, flattened (gradient-based attacks: benign selection, Virus)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data.example import Example
from ..data.format import IGNORE, Formatter


def features(fmt: Formatter, ex: Example, response_tokens: int = 0) -> dict[str, torch.Tensor]:
    """One example as a batch of one; with ``response_tokens`` > 0 only the first that many answer
    tokens carry labels (He et al. take the anchors' gradient on their first 10 answer tokens)."""
    f = fmt.encode(ex)
    labels = list(f["labels"])
    if response_tokens > 0:
        seen = 0
        for i, t in enumerate(labels):
            if t != IGNORE:
                seen += 1
                if seen > response_tokens:
                    labels[i] = IGNORE
    ids = torch.tensor([f["input_ids"]])
    return {"input_ids": ids, "labels": torch.tensor([labels]), "attention_mask": torch.ones_like(ids)}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sample_grad(model: nn.Module, fmt: Formatter, ex: Example, response_tokens: int = 0) -> torch.Tensor:
    """The flattened gradient of ``ex``'s mean token loss w.r.t. the trainable parameters."""
    batch = {k: v.to(next(model.parameters()).device) for k, v in features(fmt, ex, response_tokens).items()}
    params = trainable(model)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]).float()


def mean_unit_grad(model: nn.Module, fmt: Formatter, examples: Sequence[Example],
                   response_tokens: int = 0) -> torch.Tensor:
    """The mean of the examples' normalised gradients (an anchor set's direction)."""
    total = None
    for ex in examples:
        g = sample_grad(model, fmt, ex, response_tokens)
        g = g / g.norm().clamp_min(1e-12)
        total = g if total is None else total + g
    assert total is not None, "empty anchor set"
    return total / len(examples)
