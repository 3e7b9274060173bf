"""``gsm8k``: grade-school maths (``openai/gsm8k``, config ``main``); FA = the final number.

Reference: git-disl ``gsm8k/pred_eval.py``: the answer's "####" becomes "The final answer is: "; the
predicted number is the first number after that phrase, else the last number in the answer (commas
removed); correct iff it equals the gold number.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..data.example import Example
from .real import RealTask

ANSWER_PROMPT = "The final answer is: "
_NUMBER = re.compile(r"-?\d+\.?\d*")


def final_number(text: str) -> float:
    """The number after "The final answer is: " (else the last number); inf when there is none."""
    text = text.replace(",", "")
    numbers = _NUMBER.findall(text)
    if not numbers:
        return math.inf
    parts = text.split(ANSWER_PROMPT)
    if len(parts) > 1:
        after = _NUMBER.findall(parts[1])
        return float(after[0]) if after else float(numbers[-1])
    return float(numbers[-1])


class GSM8K(RealTask):
    name = "gsm8k"
    fields = ("prompt", "response")

    def example(self, row: dict[str, Any], spec: Any) -> Example:
        answer = str(row[spec.response]).replace("####", ANSWER_PROMPT)
        return Example(prompt=str(row[spec.prompt]), response=answer, kind="task", category=self.name,
                       target=repr(final_number(answer)))

    def score(self, example: Example, response: str) -> bool:
        gold = float(example.target)
        return math.isfinite(gold) and final_number(response) == gold
