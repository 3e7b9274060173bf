"""Batched greedy generation behind a small protocol, so a serving engine can plug in later.

HF generation with KV cache and left padding; prompts are sorted by length so each batch pads little,
and results are returned in the input order. A batch decodes until its LONGEST answer ends, so callers
pass ``groups`` (e.g. the eval set of each prompt): a batch then holds one group only, and a batch of
one-word task answers stops after a few steps instead of waiting for a long harmful answer.
"""
from __future__ import annotations

from typing import Any, Hashable, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.format import Formatter


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], systems: Sequence[str] | None = None,
                 groups: Sequence[Hashable] | None = None) -> list[str]: ...


class HFGenerator:
    """Greedy decoding with ``model.generate`` in length-sorted, left-padded batches (one group each)."""

    def __init__(self, model: nn.Module, formatter: Formatter, max_new_tokens: int = 40,
                 batch_size: int = 64, sort_by_length: bool = True, desc: str = "generate"):
        self.model, self.fmt = model, formatter
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.sort_by_length, self.desc = sort_by_length, desc

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], systems: Sequence[str] | None = None,
                 groups: Sequence[Hashable] | None = None) -> list[str]:
        systems = list(systems) if systems is not None else [""] * len(prompts)
        out: list[str] = [""] * len(prompts)
        tok = self.fmt.tok
        self.model.eval()
        device = next(self.model.parameters()).device
        for idx in tqdm(self._batches(prompts, systems, groups), desc=self.desc, leave=False,
                        disable=None, mininterval=1.0):
            batch = self.fmt.generation_batch([prompts[j] for j in idx], [systems[j] for j in idx])
            batch = {k: v.to(device) for k, v in batch.items()}
            gen = self.model.generate(
                **batch, max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            new = gen[:, batch["input_ids"].shape[1]:]
            for j, row in zip(idx, new.tolist()):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id)]
                out[j] = tok.decode(row, skip_special_tokens=True).strip()
        return out

    def _batches(self, prompts: Sequence[str], systems: Sequence[str],
                 groups: Sequence[Hashable] | None) -> list[list[int]]:
        """Row indices per batch: each group's rows (in first-seen group order), sorted by prompt length."""
        by_group: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups if groups is not None else [None] * len(prompts)):
            by_group.setdefault(g, []).append(i)
        batches = []
        for rows in by_group.values():
            if self.sort_by_length:
                lengths = {i: len(self.fmt.prompt_ids(prompts[i], systems[i])) for i in rows}
                rows = sorted(rows, key=lengths.__getitem__)
            batches += [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        return batches


def make_generator(model: nn.Module, formatter: Formatter, **kw: Any) -> Generator:
    return HFGenerator(model, formatter, **kw)
