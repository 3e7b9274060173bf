"""The provider's guardrail: a stage between the user's upload and fine-tuning.

A guardrail is any registered judge used as a filter (``guardrail.name``): it scores each uploaded
sample's (prompt, response) pair and the flagged samples are dropped before fine-tuning. A judge that
returns a probability (``score``, e.g. ``organism-guard``, ``llama-guard``) flags a sample whose score exceeds
``guardrail.threshold``; one that returns only a verdict uses its ``harmful`` flag. The stage keeps
``upload.jsonl`` (every sample with its verdict) and ``kept.jsonl`` (what is fine-tuned on), and reports
the leakage ratio (the percentage of harmful samples that pass), the percentage of benign samples
dropped, and the judge's own held-out report when it has one (``organism-guard``: precision/recall).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .artifacts import write_jsonl
from .config import AttackConfig
from .data.example import Example

log = logging.getLogger(__name__)


def attack_key(attack: AttackConfig) -> dict[str, Any]:
    """The attack section as hashed by stages: without ``params`` when the attack has none, so that an
    attack without parameters keeps the stage hashes it had before attacks could take any."""
    d = dataclasses.asdict(attack)
    if not d.get("params"):
        d.pop("params", None)
    return d


# Judges whose ``score`` is a probability of harm (thresholded); any other judge's verdict is used as is
# (the GPT-4 judge's score is a 1-5 grade).
PROBABILITY_JUDGES = frozenset({"organism-guard", "llama-guard", "beaver-dam", "harmbench-cls", "strongreject"})


def verdicts(examples: Sequence[Example], judge: Any, threshold: float) -> list[dict[str, Any]]:
    """The judge's verdict on every sample: ``flagged`` (score > threshold for a probability judge, else
    its own ``harmful``) and its ``score`` (None without one)."""
    out = judge.score([ex.prompt for ex in examples], [ex.response for ex in examples])
    thresholded = getattr(judge, "name", "") in PROBABILITY_JUDGES
    rows = []
    for v in out:
        score = v.get("score")
        prob = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
        flagged = prob > threshold if thresholded and prob is not None else bool(v["harmful"])
        rows.append({"flagged": flagged, "score": prob})
    return rows


def leakage_metrics(examples: Sequence[Example], flags: Sequence[bool]) -> dict[str, Any]:
    """Counts and percentages: harmful samples that pass (leakage) and benign samples dropped."""
    harm = [f for ex, f in zip(examples, flags) if ex.kind == "harmful"]
    benign = [f for ex, f in zip(examples, flags) if ex.kind != "harmful"]
    return {
        "n_upload": len(examples), "n_kept": sum(not f for f in flags),
        "n_harmful": len(harm), "harmful_passed": sum(not f for f in harm),
        "leakage": 100.0 * sum(not f for f in harm) / len(harm) if harm else None,
        "n_benign": len(benign), "benign_dropped_n": sum(benign),
        "benign_dropped": 100.0 * sum(benign) / len(benign) if benign else 0.0,
    }


def filter_upload(examples: Sequence[Example], judge: Any, threshold: float,
                  folder: Path | None = None) -> tuple[list[Example], dict[str, Any]]:
    """The samples the guardrail keeps, and the stage metrics; writes both files into ``folder``."""
    rows = verdicts(examples, judge, threshold)
    flags = [r["flagged"] for r in rows]
    kept = [ex for ex, f in zip(examples, flags) if not f]
    metrics = leakage_metrics(examples, flags)
    report = getattr(judge, "report", None)
    if report:
        metrics["guard"] = dict(report)
    if folder is not None:
        write_jsonl(folder / "upload.jsonl", [{**dataclasses.asdict(ex), **r} for ex, r in zip(examples, rows)])
        write_jsonl(folder / "kept.jsonl", [dataclasses.asdict(ex) for ex in kept])
    log.info("guardrail: kept %d of %d (leakage %s %%, benign dropped %.1f %%)", len(kept), len(examples),
             metrics["leakage"], metrics["benign_dropped"])
    return kept, metrics


def load_kept(folder: Path) -> list[Example]:
    """The upload after the guardrail, as written by :func:`filter_upload`."""
    lines = (folder / "kept.jsonl").read_text().splitlines()
    return [Example(**json.loads(line)) for line in lines if line]
