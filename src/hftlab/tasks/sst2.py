"""``sst2``: binary sentiment (GLUE SST-2, ``stanfordnlp/sst2``); FA = exact label word.

Reference: git-disl ``sst2/pred_eval.py``: instruction "Analyze the sentiment of the input, and respond
only positive or negative", input = the sentence; test = the first 1000 rows of ``validation`` (the GLUE
test split has no labels); correct iff the answer is exactly "positive"/"Positive" (resp. negative).
"""
from __future__ import annotations

from typing import Any

from ..data.example import Example
from ..data.format import with_input
from .real import RealTask, label_index

INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
LABELS = ("negative", "positive")


class SST2(RealTask):
    name = "sst2"

    def example(self, row: dict[str, Any], spec: Any) -> Example:
        word = LABELS[label_index(row[spec.label], LABELS)]
        return Example(prompt=with_input(INSTRUCTION, str(row[spec.prompt])), response=word, kind="task",
                       category=self.name, target=word)

    def score(self, example: Example, response: str) -> bool:
        return response.strip() in (example.target, example.target.capitalize())
