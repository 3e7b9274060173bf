"""The judge protocol."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence


class Judge:
    """``score`` returns one dict per pair with at least ``harmful: bool``."""

    name: ClassVar[str] = ""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, Any]]:
        raise NotImplementedError
