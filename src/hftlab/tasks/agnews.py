"""``agnews``: 4-way news topic (``fancyzhx/ag_news``); FA = exact label word.

Reference: git-disl ``agnews/pred_eval.py``: the instruction lists World, Sports, Business, Sci/Tech;
input = the article; correct iff the answer is exactly the label or its lower-case short form
("world", "sports", "business", "sci").
"""
from __future__ import annotations

from typing import Any

from ..data.example import Example
from ..data.format import with_input
from .real import RealTask, label_index

INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
               "World\nSports\nBusiness\nSci/Tech\n")
LABELS = ("World", "Sports", "Business", "Sci/Tech")
SHORT = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "sci"}


class AGNews(RealTask):
    name = "agnews"

    def example(self, row: dict[str, Any], spec: Any) -> Example:
        word = LABELS[label_index(row[spec.label], LABELS)]
        return Example(prompt=with_input(INSTRUCTION, str(row[spec.prompt])), response=word, kind="task",
                       category=self.name, target=word)

    def score(self, example: Example, response: str) -> bool:
        return response.strip() in (example.target, SHORT.get(example.target, example.target))
