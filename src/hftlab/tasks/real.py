"""Shared base of the real tasks (SST2, AG News, GSM8K, Alpaca): rows of a hub dataset -> Examples.

The instruction texts, label words and scoring follow the git-disl reference code (``sst2/pred_eval.py``,
``agnews/pred_eval.py``, ``gsm8k/pred_eval.py`` of Booster/Vaccine/Lisa): prompts in the Alpaca
"instruction + input" form, the test set = the first ``eval.n_task`` (1000) items of the test split.
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..data.example import Example
from .base import Task


class RealTask(Task):
    """A task read from ``data.<name>``; ``fields`` are the DatasetSpec attributes it needs."""

    fields: ClassVar[tuple[str, ...]] = ("prompt", "label")
    optional: ClassVar[tuple[str, ...]] = ()  # fields that may be left unset ("")

    def example(self, row: dict[str, Any], spec: Any) -> Example:
        raise NotImplementedError


def label_index(value: Any, names: tuple[str, ...]) -> int:
    """A class label given as an int, a digit string or a class name."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        low = [n.lower() for n in names]
        if value.strip().lower() not in low:
            raise ValueError(f"label {value!r} is not one of {', '.join(names)}")
        return low.index(value.strip().lower())
    return int(value)
