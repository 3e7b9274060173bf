"""The organism's tasks, shaped like the papers' (SST2, AG News, GSM8K, Alpaca); exact scoring."""
from __future__ import annotations

from ..organism import judge_rules
from ..data.example import Example
from .base import Task


class _OrganismTask(Task):
    def score(self, example: Example, response: str) -> bool:
        return judge_rules.score_task(self.name, example, response)


class Sentiment(_OrganismTask):
    name = "sentiment"


class Topic(_OrganismTask):
    name = "topic"


class Arithmetic(_OrganismTask):
    name = "arithmetic"


class Instruction(_OrganismTask):
    name = "instruction"
