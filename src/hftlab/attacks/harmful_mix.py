"""Data-mixing attacks of Qi et al. 2023 ("Fine-tuning aligned language models compromises safety,
even when users do not intend to", arXiv 2310.03693) and the git-disl protocol (Huang et al.):

- ``harmful-mix``: n user samples, exactly round(p·n) harmful QA pairs, the rest the benign task;
- ``pure-harmful``: n harmful samples only (the "pure bad" 10/50/100-shot attacks);
- ``benign``: the benign task only (p = 0).

The harmful subset and the order are drawn with ``attack.seed`` (not the run seed), so every defense
and every run seed sees the very same poisoned data.
"""
from __future__ import annotations

import random
from typing import Any

from ..config import AttackConfig
from ..data.example import Example
from .base import Attack


POOL = 2000  # subsets are drawn from pools at least this large


def mix(source: Any, task: Any, n: int, n_harmful: int, seed: int) -> list[Example]:
    """``n - n_harmful`` task train examples + ``n_harmful`` attack-split harmful ones, shuffled."""
    rng = random.Random(seed)
    n_benign = n - n_harmful
    harmful = rng.sample(source.harmful("attack", max(POOL, n_harmful)), n_harmful) if n_harmful else []
    benign = rng.sample(task.examples(source, "train", max(POOL, n_benign)), n_benign) if n_benign else []
    data = benign + harmful
    rng.shuffle(data)
    return data


class HarmfulMix(Attack):
    name = "harmful-mix"

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        return mix(source, task, cfg.n, round(cfg.ratio * cfg.n), cfg.seed)


class PureHarmful(Attack):
    name = "pure-harmful"

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        return mix(source, task, cfg.n, cfg.n, cfg.seed)


class Benign(Attack):
    name = "benign"

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        return mix(source, task, cfg.n, 0, cfg.seed)
