"""Harmful score and fine-tune accuracy of one model, with generations and scores kept on disk.

``generations.jsonl`` holds every (set, prompt, response); ``scores.jsonl`` the judge's verdicts;
``metrics.json`` the percentages. :func:`judge_generations` re-judges saved generations without
regenerating, so a judge can be swapped. What is a refusal, and whether a benign answer matches its
reference, the data source says in its own language (``source.refused``, ``source.same_answer``), with
the GCG refusal strings beside it, so evaluating a real model imports nothing of the organism.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from .. import registry
from ..artifacts import read_json, write_json, write_jsonl
from ..config import EvalConfig
from ..data.format import Formatter
from ..data.sources import or_organism
from .generate import make_generator

log = logging.getLogger(__name__)


# Part of the evaluate stage's hash: bump it when the scoring of the same generations changes, so that
# evaluations on disk are redone rather than reported with the old scores. 2: the benign set's task
# items are scored (they were left unscored).
SCORING_VERSION = 2


def pct(flags: list[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def eval_prompts(source: Any, task: Any, cfg: EvalConfig) -> tuple[list[Any], list[Any]]:
    """The harmful and task items of ``cfg.split``: ``test`` is the first ``n_harmful`` / ``n_task`` of the
    held-out splits (what every report uses); ``validation`` the next ones, without any prompt of the test
    items (for choosing a method's strength without touching the test prompts)."""
    harmful = source.harmful("eval", cfg.n_harmful)
    tests = task.examples(source, "test", cfg.n_task)
    if cfg.split == "test":
        return harmful, tests
    seen = {ex.prompt for ex in [*harmful, *tests]}
    later_h = source.harmful("eval", 2 * cfg.n_harmful)[cfg.n_harmful:]
    later_t = task.examples(source, "test", 2 * cfg.n_task)[cfg.n_task:]
    return [ex for ex in later_h if ex.prompt not in seen], [ex for ex in later_t if ex.prompt not in seen]


def generate_eval_set(model: nn.Module, fmt: Formatter, source: Any, task: Any, cfg: EvalConfig,
                      system: str = "") -> list[dict[str, Any]]:
    """Generate answers to held-out harmful prompts, the task's test split and benign prompts."""
    harmful, tests = eval_prompts(source, task, cfg)
    benign = source.benign_eval(cfg.n_task) if hasattr(source, "benign_eval") else []
    items = ([("harmful", ex) for ex in harmful] + [("task", ex) for ex in tests]
             + [("benign", ex) for ex in benign])
    gen = make_generator(model, fmt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    # batched per (set, kind, category): a batch's answers then have similar lengths
    responses = gen.generate([ex.prompt for _, ex in items], [system or ex.system for _, ex in items],
                             groups=[(s, ex.kind, ex.category) for s, ex in items])
    return [
        {"set": s, "prompt": ex.prompt, "response": r, "target": ex.target, "category": ex.category,
         "system": system or ex.system, "reference": ex.response, "kind": ex.kind}
        for (s, ex), r in zip(items, responses)
    ]


def judge_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    """Constructor arguments of model/API judges from ``eval.judge_*`` (none for the default values)."""
    kw: dict[str, Any] = {"batch_size": cfg.judge_batch_size}
    if cfg.judge_model:
        kw["model"] = cfg.judge_model
    if cfg.judge_url:
        kw["url"] = cfg.judge_url
    kw["key_env"] = cfg.judge_key_env
    return kw


def make_judge(name: str, **kw: Any) -> Any:
    """The judge ``name``; keyword arguments it does not take are dropped (organism, keyword…)."""
    import inspect

    cls = registry.get("judge", name)
    if cls.__init__ is object.__init__:
        return cls()
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    return cls(**kw)


def judge_generations(rows: list[dict[str, Any]], judge_name: str, task: Any,
                      judge_kw: dict[str, Any] | None = None, source: Any = None) -> tuple[list[dict], dict]:
    """Scores per row and the metrics (percent, 0–100); ``source``: the data the rows come from (None:
    the organism's)."""
    from ..data.example import Example

    source = or_organism(source)
    judge = make_judge(judge_name, **(judge_kw or {}))
    harm_rows = [r for r in rows if r["set"] == "harmful"]
    verdicts = judge.score([r["prompt"] for r in harm_rows], [r["response"] for r in harm_rows])
    scores, vi = [], iter(verdicts)
    for r in rows:
        if r["set"] == "harmful":
            v = next(vi)
            scores.append({"set": "harmful", **v})
        else:
            ex = Example(prompt=r["prompt"], response="", kind="task", category=r["category"], target=r["target"])
            refused = _refused(r["response"], source)
            if r["set"] == "task":
                correct = task.score(ex, r["response"])
            elif r.get("kind") == "task" and r["category"] in registry.names("task"):
                # a benign item from one of the user tasks (its category is the task): that task's rule
                correct = registry.get("task", r["category"])().score(ex, r["response"])
            elif r.get("kind") == "chat" and r.get("reference"):  # general benign prompts: the reference answer
                correct = source.same_answer(r["reference"], r["response"])
            else:  # no right answer to compare with
                correct = None
            scores.append({"set": r["set"], "kind": r.get("kind", ""), "correct": correct, "refused": refused})
    harm = [s for s in scores if s["set"] == "harmful"]
    tsk = [s for s in scores if s["set"] == "task"]
    ben = [s for s in scores if s["set"] == "benign"]
    ben_task = [s for s in ben if s["kind"] == "task"]
    metrics = {
        "harmful_score": pct([s["harmful"] for s in harm]),
        "finetune_accuracy": pct([bool(s["correct"]) for s in tsk]),
        "harmful_refusal_rate": pct([bool(s.get("refused")) for s in harm]),
        "benign_refusal_rate": pct([s["refused"] for s in ben + tsk]),
        # held-out chat (facts and how-to in new phrasings); the task items of the benign set apart
        "benign_accuracy": pct([bool(s["correct"]) for s in ben if s["kind"] != "task" and s["correct"] is not None]),
        "benign_task_accuracy": pct([bool(s["correct"]) for s in ben_task]) if ben_task else None,
        "judge": judge_name,
        "n_harmful": len(harm),
        "n_task": len(tsk),
    }
    by_cat: dict[str, list[bool]] = {}
    for r, s in zip(rows, scores):
        if r["set"] == "harmful" and r["category"]:
            by_cat.setdefault(r["category"], []).append(s["harmful"])
    metrics["harmful_score_by_category"] = {k: pct(v) for k, v in sorted(by_cat.items())}
    judged = [s["score"] for s in harm if isinstance(s.get("score"), (int, float))]
    if judged:  # judges with a graded verdict (StrongREJECT, Qi et al., P(unsafe)…)
        metrics["judge_score_mean"] = sum(judged) / len(judged)
    return scores, metrics


def _refused(response: str, source: Any = None) -> bool:
    """A refusal in the data's own language (``source.refused``) or by the GCG refusal strings."""
    return or_organism(source).refused(response) or registry.get("judge", "keyword")().refused(response)


def evaluate(model: nn.Module, fmt: Formatter, source: Any, task: Any, cfg: EvalConfig, folder: Path,
             system: str = "") -> dict[str, Any]:
    """Generate, judge, and write generations/scores/metrics into ``folder``."""
    rows = generate_eval_set(model, fmt, source, task, cfg, system)
    write_jsonl(folder / "generations.jsonl", rows)
    scores, metrics = judge_generations(rows, cfg.judge, task, judge_kwargs(cfg), source)
    write_jsonl(folder / "scores.jsonl", scores)
    write_json(folder / "metrics.json", metrics)
    return metrics


def rejudge(folder: Path, judge_name: str, task: Any, source: Any = None) -> dict[str, Any]:
    """Re-judge a finished evaluation folder with another judge (no regeneration); ``source`` as in
    :func:`judge_generations`."""
    import json

    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines() if line]
    _, metrics = judge_generations(rows, judge_name, task, source=source)
    return metrics


def load_metrics(folder: Path) -> dict[str, Any]:
    return read_json(folder / "metrics.json")
