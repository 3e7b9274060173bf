"""The task protocol."""
from __future__ import annotations

from typing import Any, ClassVar

from ..data.example import Example


class Task:
    """A benign user task: its train/test examples come from a data source; scoring is exact."""

    name: ClassVar[str] = ""

    def examples(self, source: Any, split: str, n: int) -> list[Example]:
        return source.task(self.name, split, n)

    def score(self, example: Example, response: str) -> bool:
        raise NotImplementedError
