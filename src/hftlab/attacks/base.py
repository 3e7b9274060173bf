"""The attack protocol: ``build(source, task, cfg) -> list[Example]`` (the user's upload)."""
from __future__ import annotations

from typing import Any, ClassVar

from ..config import AttackConfig
from ..data.example import Example


class Attack:
    name: ClassVar[str] = ""

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        raise NotImplementedError
