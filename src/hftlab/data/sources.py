"""Data sources: where alignment, provider-harmful, attack, evaluation and task data come from.

A source answers ``alignment(n)``, ``harmful(split, n)`` (split: provider | attack | eval),
``task(name, split, n)`` and ``benign_eval(n)`` with :class:`Example` lists. The organism's world is the
default; real datasets (BeaverTails, SST2, …) implement the same methods.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..organism.world import World


@lru_cache(maxsize=4)
def organism_source(seed: int = 0) -> World:
    return World(seed)


def get_source(name: str, data_cfg: Any = None) -> Any:
    """The source named by ``data.source``; ``hub`` reads the datasets configured in ``data_cfg``."""
    if name == "organism":
        from ..organism.build import ORGANISM

        return organism_source(ORGANISM["seed"])
    if name == "hub":
        from ..config import DataConfig
        from .hub import HubSource

        return HubSource(data_cfg if data_cfg is not None else DataConfig())
    raise ValueError(f"data.source: unknown source '{name}' (known: organism, hub)")
