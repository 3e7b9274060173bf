"""``alpaca``: general instructions (``tatsu-lab/alpaca``); FA = ROUGE-L F1 against the reference.

Prompts are the instruction (with its input, when there is one) in the Alpaca template, as in the
reference code. Deviation: the papers score Alpaca with AlpacaEval (a GPT-4 judge's win rate on
``tatsu-lab/alpaca_eval`` items 701+); offline, a test item counts as correct when the ROUGE-L F1 of the
answer against the dataset's reference output is at least :data:`THRESHOLD`. Test items are the last
rows of the train split (the dataset has no other split) and never appear in fine-tuning data drawn
from its first rows.
"""
from __future__ import annotations

import re
from typing import Any

from ..data.example import Example
from ..data.format import with_input
from .real import RealTask

THRESHOLD = 0.3
_WORD = re.compile(r"\w+")


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    a, b = _WORD.findall(candidate.lower()), _WORD.findall(reference.lower())
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


class Alpaca(RealTask):
    name = "alpaca"
    fields = ("prompt", "input", "response")
    optional = ("input",)

    def example(self, row: dict[str, Any], spec: Any) -> Example:
        prompt = with_input(str(row[spec.prompt]), str(row.get(spec.input) or "") if spec.input else "")
        answer = str(row[spec.response])
        return Example(prompt=prompt, response=answer, kind="task", category=self.name, target=answer)

    def score(self, example: Example, response: str) -> bool:
        return rouge_l(response, example.target) >= THRESHOLD
