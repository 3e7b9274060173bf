"""Data sources: where alignment, provider-harmful, attack, evaluation and task data come from.

A source answers ``alignment(n)``, ``harmful(split, n)`` (split: provider | attack | eval),
``task(name, split, n)`` and ``benign_eval(n)`` with :class:`Example` lists, and in its own language
``safety_prompt()``, ``trigger_words()``, ``refused(response)`` and ``same_answer(reference, response)``
(:mod:`hftlab.organism.source` says what each is for): defenses and the evaluation ask the source, so
that on real data nothing imports the organism. The organism's world is the default; real datasets
(BeaverTails, SST2, …) implement the same methods.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4)
def organism_source(seed: int = 0) -> Any:
    """The organism's world of ``seed`` as a data source (built once per process)."""
    from ..organism.source import OrganismSource

    return OrganismSource(seed)


def or_organism(source: Any) -> Any:
    """``source``, or the organism's data source when None (a defense or a re-judging used without a run)."""
    return source if source is not None else get_source("organism")


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
