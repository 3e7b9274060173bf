"""The attack protocol: ``build(source, task, cfg) -> list[Example]`` (the user's upload).

An attack with parameters declares a ``Config`` dataclass (``attack.KEY=V`` on the command line,
checked against it); the pipeline constructs it with those values. An attack that needs the model it
attacks (gradient-based selection or optimisation) reads ``self.ctx`` (:class:`AttackContext`), bound by
the pipeline before ``build``. An attack that changes how the fine-tuned model is queried (a system
prompt, a trigger, a cipher) lists :class:`View` s: the pipeline evaluates the final model once more
under each, beside the plain evaluation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..config import AttackConfig
from ..data.example import Example


def _same(text: str) -> str:
    return text


@dataclass(frozen=True)
class View:
    """How an attacker queries the fine-tuned model: ``system`` prompt, ``prompt`` transform applied to
    every evaluation prompt, and ``decode`` applied to the prompt and the answer before judging."""

    name: str
    system: str = ""
    prompt: Callable[[str], str] = _same
    decode: Callable[[str], str] = _same


@dataclass
class AttackContext:
    """What the pipeline lends an attack: loaders of the models it may read (``aligned``, ``base``), the
    formatter of the fine-tuning stage, and the run seed."""

    loaders: dict[str, Callable[[], Any]] = field(default_factory=dict)
    formatter: Any = None
    seed: int = 0


class Attack:
    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None

    def __init__(self, **params: Any):
        if self.Config is None:
            if params:
                raise ValueError(f"attack '{self.name}' takes no parameters, got {sorted(params)}")
            self.params = None
        else:
            self.params = self.Config(**params)
            check = getattr(self.params, "check", None)
            if check is not None:
                check()
        self.ctx: AttackContext | None = None

    def bind(self, ctx: AttackContext) -> "Attack":
        self.ctx = ctx
        return self

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        raise NotImplementedError

    def views(self, source: Any) -> list[View]:
        """Extra evaluations of the final model on ``source`` (none by default)."""
        return []

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params) if self.params is not None else {}
