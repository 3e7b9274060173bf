"""Batched greedy generation behind a small protocol, so a serving engine can plug in later.

HF generation with KV cache and left padding; prompts are sorted by length so each batch pads little,
and results are returned in the input order.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.format import Formatter


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], systems: Sequence[str] | None = None) -> list[str]: ...


class HFGenerator:
    """Greedy decoding with ``model.generate`` in length-sorted, left-padded batches."""

    def __init__(self, model: nn.Module, formatter: Formatter, max_new_tokens: int = 40,
                 batch_size: int = 64, sort_by_length: bool = True, desc: str = "generate"):
        self.model, self.fmt = model, formatter
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.sort_by_length, self.desc = sort_by_length, desc

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], systems: Sequence[str] | None = None) -> list[str]:
        systems = list(systems) if systems is not None else [""] * len(prompts)
        order = list(range(len(prompts)))
        if self.sort_by_length:
            lengths = [len(self.fmt.prompt_ids(p, s)) for p, s in zip(prompts, systems)]
            order.sort(key=lambda i: lengths[i])
        out: list[str] = [""] * len(prompts)
        tok = self.fmt.tok
        self.model.eval()
        device = next(self.model.parameters()).device
        for i in tqdm(range(0, len(order), self.batch_size), desc=self.desc, leave=False,
                      disable=None, mininterval=1.0):
            idx = order[i: i + self.batch_size]
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


def make_generator(model: nn.Module, formatter: Formatter, **kw: Any) -> Generator:
    return HFGenerator(model, formatter, **kw)
