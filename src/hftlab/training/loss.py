"""The language-model loss of a batch, and the CPU length grouping that every loss here shares.

On CPU (one process) a right-padded batch whose rows differ much in length runs as a few length groups,
each padded only to its own longest row: the same sums over the same tokens divided by the same counts,
so the values and gradients are the padded batch's (up to float rounding), without the padding compute.
Only this module and the shared helpers of ``defenses/perturbation.py`` see the groups: a method asks for
:func:`lm_loss`, :func:`paired_outputs` / :func:`paired_logits` / :func:`paired_mean` (its policy's and a
frozen reference's forwards) or ``perturbation.outputs_by_group`` and writes its maths for the whole batch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], by_length: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the batch.

    On CPU (one process), a right-padded batch whose rows differ much in length runs as a few length
    groups, each padded only to its own longest row (:func:`batch_pieces`). The loss is the same sum
    over the same tokens divided by the same count, so its value and gradient are those of the padded
    batch (up to float rounding); only the padding compute goes. ``by_length=False`` keeps one forward.
    """
    pieces = batch_pieces(model, batch, by_length)
    n_items = label_count(batch) if len(pieces) > 1 else None
    return sum(piece_loss(model, p, n_items) for p in pieces)


def batch_pieces(model: nn.Module, batch: dict[str, torch.Tensor], by_length: bool = True) -> list[dict]:
    """The batch as its length groups (CPU, one process, right-padded, when it saves compute), else [batch]."""
    return pieces_of(batch, row_groups(model, batch, by_length))


def pieces_of(batch: dict[str, torch.Tensor], groups: list[tuple[torch.Tensor, int]] | None) -> list[dict]:
    """The batch cut into ``groups`` (from :func:`row_groups`), or [batch] when None."""
    if groups is None:
        return [batch]
    return [{k: v[rows, :width] for k, v in batch.items()} for rows, width in groups]


def row_groups(model: nn.Module, batch: dict[str, torch.Tensor],
               by_length: bool = True) -> list[tuple[torch.Tensor, int]] | None:
    """(rows, width) of each length group of :func:`batch_pieces`, or None when the batch stays whole."""
    if not (by_length and _may_split(model, batch["input_ids"])):
        return None
    return length_groups(batch["attention_mask"])


def paired_outputs(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor], with_loss: bool = False,
                   **kw: Any) -> Iterator[tuple[Any, Any, dict[str, torch.Tensor]]]:
    """(output, reference output, rows) of the batch under ``model`` and the frozen ``ref_model`` (no
    gradient), per length group on CPU as in :func:`lm_loss` (else the whole batch once): sum over what it
    yields. ``with_loss``: the output's ``loss`` is those rows' share of the batch's mean loss (summing
    them gives the batch's). ``kw`` goes to both forwards (e.g. ``output_hidden_states=True``)."""
    pieces = batch_pieces(model, batch)
    share = {"num_items_in_batch": label_count(batch)} if with_loss and len(pieces) > 1 else {}
    for piece in pieces:
        inputs = {"input_ids": piece["input_ids"], "attention_mask": piece["attention_mask"], **kw, "use_cache": False}
        out = model(**inputs, labels=piece["labels"], **share) if with_loss else model(**inputs)
        with torch.no_grad():
            ref = ref_model(**inputs)
        yield out, ref, piece


def paired_logits(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits, reference logits, labels) of :func:`paired_outputs`: sum a per-token quantity over them."""
    for out, ref, rows in paired_outputs(model, ref_model, batch):
        yield out.logits, ref.logits, rows["labels"]


def paired_mean(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor],
                token_sum: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ ``token_sum(logits, ref_logits, labels)`` over :func:`paired_logits`, divided by the batch's number of
    labelled positions: the mean of a per-token quantity against a frozen reference (KL, SafeGrad)."""
    total = torch.zeros((), device=batch["input_ids"].device)
    for logits, ref_logits, labels in paired_logits(model, ref_model, batch):
        total = total + token_sum(logits, ref_logits, labels)
    return total / label_count(batch).clamp(min=1)


def label_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of predicted (shifted, labelled) tokens: the denominator of the batch's mean loss."""
    return (batch["labels"][:, 1:] != -100).sum()


def piece_loss(model: nn.Module, piece: dict[str, torch.Tensor], n_items: torch.Tensor | None) -> torch.Tensor:
    """Sum of the piece's token losses / ``n_items`` (the whole batch's count); the mean if None."""
    kw = {"num_items_in_batch": n_items} if n_items is not None else {}
    return model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], labels=piece["labels"],
                 **kw).loss


SPLIT_OVERHEAD = 96  # cost of one extra forward, in padded token positions (measured on the organism, CPU)


def _may_split(model: nn.Module, ids: torch.Tensor) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return ids.device.type == "cpu" and ids.shape[0] > 1 and not isinstance(model, DistributedDataParallel)


def length_groups(mask: torch.Tensor, overhead: int = SPLIT_OVERHEAD) -> list[tuple[torch.Tensor, int]] | None:
    """Rows of a right-padded batch in contiguous length groups minimising padded positions plus
    ``overhead`` per group (exact dynamic programme over the sorted lengths); None if one group is best."""
    lengths = mask.sum(1)
    if not bool((mask[:, :-1] >= mask[:, 1:]).all()):  # not right-padded: leave it alone
        return None
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * ls[j - 1] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    if len(bounds) == 1:
        return None
    return [(order[i:j], int(ls[j - 1])) for i, j in reversed(bounds)]
