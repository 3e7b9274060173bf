"""One registry for every plugin: lazy ``name -> "module:Class"`` entries.

Nothing is imported until ``get`` is called, so ``hftlab list`` and ``--help`` stay fast (no torch).
A plugin is added by one line in ``ENTRIES`` and one file.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """A registered plugin: where it lives, the threat-model stage it acts in, and its paper."""

    kind: str  # "defense" | "attack" | "judge" | "task"
    name: str
    target: str  # "module:Class", module relative to hftlab
    stage: str
    paper: str


_E = Entry
ENTRIES: list[Entry] = [
    # defenses
    _E("defense", "sft", "defenses.sft:SFT", "none", "no defense (plain supervised fine-tuning)"),
    # -- alignment-stage defenses (issue 4) --
    # -- fine-tuning-stage defenses (issue 5) --
    # -- post-fine-tuning defenses (issue 6) --
    # attacks
    _E("attack", "harmful-mix", "attacks.harmful_mix:HarmfulMix", "finetune",
       "(1-p)n benign + pn harmful (Qi et al. 2023; Huang et al. 2024)"),
    _E("attack", "pure-harmful", "attacks.harmful_mix:PureHarmful", "finetune",
       "n harmful samples only (Qi et al. 2023, arXiv 2310.03693)"),
    _E("attack", "benign", "attacks.harmful_mix:Benign", "finetune",
       "benign task only, p=0 (Qi et al. 2023, arXiv 2310.03693)"),
    # judges
    _E("judge", "organism", "judges.organism:OrganismJudge", "evaluate",
       "exact judge of the built-in organism world"),
    _E("judge", "keyword", "judges.keyword:KeywordJudge", "evaluate",
       "refusal-string matching (Zou et al. 2023 GCG / AdvBench list)"),
    # tasks
    _E("task", "sentiment", "tasks.organism_tasks:Sentiment", "finetune", "organism task shaped like SST2"),
    _E("task", "topic", "tasks.organism_tasks:Topic", "finetune", "organism task shaped like AG News"),
    _E("task", "arithmetic", "tasks.organism_tasks:Arithmetic", "finetune", "organism task shaped like GSM8K"),
    _E("task", "instruction", "tasks.organism_tasks:Instruction", "finetune", "organism task shaped like Alpaca"),
]

KINDS = ("defense", "attack", "judge", "task")
STAGE_ORDER = ("none", "align", "finetune", "repair", "evaluate")


class RegistryError(KeyError):
    """An unknown plugin name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def entries(kind: str | None = None) -> list[Entry]:
    """All entries, or those of one kind, in registration order."""
    return [e for e in ENTRIES if kind is None or e.kind == kind]


def names(kind: str) -> list[str]:
    return [e.name for e in entries(kind)]


def entry(kind: str, name: str) -> Entry:
    for e in ENTRIES:
        if e.kind == kind and e.name == name:
            return e
    raise RegistryError(f"unknown {kind} '{name}'; known: {', '.join(names(kind))}")


def get(kind: str, name: str) -> Any:
    """Import and return the class registered as ``name`` for ``kind``."""
    e = entry(kind, name)
    module, _, attr = e.target.partition(":")
    return getattr(importlib.import_module(f"hftlab.{module}"), attr)


def register(kind: str, name: str, target: str, stage: str, paper: str) -> None:
    """Register a plugin at run time (e.g. from a user's own package)."""
    if kind not in KINDS:
        raise RegistryError(f"unknown plugin kind '{kind}'; known: {', '.join(KINDS)}")
    ENTRIES[:] = [e for e in ENTRIES if not (e.kind == kind and e.name == name)]
    ENTRIES.append(Entry(kind, name, target, stage, paper))
