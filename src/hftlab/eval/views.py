"""Evaluation under an attack's :class:`~hftlab.attacks.base.View`: the attacker's way of querying.

The evaluation prompts (harmful, task, benign) go through ``view.prompt`` and ``view.system``; the
prompts and answers are passed through ``view.decode`` before judging (a cipher attack's answers are
decoded, then judged as usual). ``generations.jsonl`` keeps the raw answers beside the decoded ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ..artifacts import write_json, write_jsonl
from ..config import EvalConfig
from ..data.format import Formatter
from .evaluate import generate_eval_set, judge_generations, judge_kwargs


class ViewSource:
    """A data source whose examples' prompts are rewritten by ``fn`` (everything else passes through)."""

    def __init__(self, source: Any, fn: Any):
        self._source, self._fn = source, fn

    def _map(self, items: list) -> list:
        return [dataclasses.replace(ex, prompt=self._fn(ex.prompt)) for ex in items]

    def harmful(self, split: str, n: int) -> list:
        return self._map(self._source.harmful(split, n))

    def task(self, name: str, split: str, n: int) -> list:
        return self._map(self._source.task(name, split, n))

    def benign_eval(self, n: int) -> list:
        return self._map(self._source.benign_eval(n)) if hasattr(self._source, "benign_eval") else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def evaluate_view(model: nn.Module, fmt: Formatter, source: Any, task: Any, cfg: EvalConfig, folder: Path,
                  view: Any) -> dict[str, Any]:
    """HS, FA and the other metrics of ``model`` queried as ``view`` says; files as :func:`evaluate`."""
    src = ViewSource(source, view.prompt)
    rows = generate_eval_set(model, fmt, src, task, cfg, view.system)
    for r in rows:
        r["raw_prompt"], r["raw_response"] = r["prompt"], r["response"]
        r["prompt"], r["response"] = view.decode(r["prompt"]), view.decode(r["response"])
    write_jsonl(folder / "generations.jsonl", rows)
    scores, metrics = judge_generations(rows, cfg.judge, task, judge_kwargs(cfg), source)
    metrics["view"] = view.name
    write_jsonl(folder / "scores.jsonl", scores)
    write_json(folder / "metrics.json", metrics)
    return metrics
