"""Shared pieces of the data-level defense tests: a context, token-id probes, and a
recorder of what one pipeline run actually feeds the training loop and the generator."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pytest

from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context

SOURCE = get_source("organism")


def user_data() -> list:
    """32 user samples of the attack recipe: 8 harmful, 24 task."""
    return SOURCE.harmful("attack", 8) + SOURCE.task("sentiment", "train", 24)


def make_ctx(fmt: Formatter | None, alignment_n: int = 400) -> Context:
    data = {"alignment": SOURCE.alignment(alignment_n), "user": user_data()}
    return Context(stage="finetune", formatter=fmt, data=data, batch_size=4)


def as_served(defense: Any, stage: str, data: list, ctx: Context) -> list:
    """``data`` as the pipeline trains on it: ``prepare_data`` then the stage's system prompt."""
    from dataclasses import replace

    data = defense.prepare_data(stage, data, ctx)
    system = defense.system_prompt(stage)
    return [replace(ex, system=system) for ex in data] if system else data


def contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
    """Whether ``sub`` occurs contiguously in ``seq``."""
    sub, seq = list(sub), list(seq)
    return any(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@dataclass
class Recording:
    """Token ids of one pipeline run, in order: generation batches and the training features per stage."""

    events: list[tuple[str, Any]] = field(default_factory=list)

    def train_features(self, stage: str) -> list[dict[str, list[int]]]:
        return next(v for k, v in self.events if k == f"train:{stage}")

    def generation_rows(self, before: str | None = None, after: str | None = None) -> list[list[int]]:
        """Unpadded prompt rows of the generation batches before/after the given training stage."""
        keys = [k for k, _ in self.events]
        lo = keys.index(f"train:{after}") if after else -1
        hi = keys.index(f"train:{before}") if before else len(keys)
        rows = []
        for k, batch in self.events[lo + 1: hi]:
            if k == "gen":
                for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
                    rows.append([t for t, m in zip(ids, mask) if m])
        return rows


@pytest.fixture()
def recording(monkeypatch) -> Recording:
    """Records the features each stage trains on and every generation batch of the evaluations."""
    import hftlab.training.loop as loop

    rec = Recording()
    original_train, original_gen = loop.train, Formatter.generation_batch

    def train(model, features, cfg, **kw):
        rec.events.append((f"train:{kw.get('desc')}", list(features)))
        return original_train(model, features, cfg, **kw)

    def generation_batch(self, prompts, systems=None):
        batch = original_gen(self, prompts, systems)
        rec.events.append(("gen", batch))
        return batch

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(Formatter, "generation_batch", generation_batch)
    return rec
