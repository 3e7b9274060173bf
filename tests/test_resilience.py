"""Runs survive SIGKILL and concurrency: a run killed during alignment, fine-tuning or evaluation resumes to
the metrics of an uninterrupted run, with every stage folder complete (its manifest) and a partial one
never reused; two runs started at once on an empty out_dir compute each stage once (``stage_lock``) and
give the same result. The organism with the FAST budgets of conftest (seconds per run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from fast_overrides import FAST

from hftlab.config import load_config
from hftlab.pipeline import run

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CMD = [sys.executable, "-m", "hftlab", "run", "--json"]
# Long enough stages to be killed inside (24 steps, 32 + 32 evaluation prompts); no aligned evaluation, so
# the stages run align -> finetune -> evaluate.
KILLABLE = [*FAST, "align.max_steps=24", "finetune.max_steps=24", "eval.n_harmful=32", "eval.n_task=32",
            "eval.evaluate_aligned=false"]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.is_file() else 0


def _in_align(out: Path) -> bool:
    return any(_lines(p) >= 1 for p in out.glob("align/*/losses.jsonl"))


def _in_finetune(out: Path) -> bool:
    return any(_lines(p) >= 1 for p in out.glob("finetune/*/losses.jsonl"))


def _in_evaluate(out: Path) -> bool:
    return any(out.glob("evaluate/.*.lock"))  # the stage holds its lock from its first instruction


def _kill_when(out: Path, ready: Callable[[Path], bool], delay: float = 0.0) -> None:
    """Start ``hftlab run`` on ``out``; SIGKILL it once ``ready(out)`` holds (plus ``delay`` seconds)."""
    proc = subprocess.Popen([*CMD, *KILLABLE, f"out_dir={out}"], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ready(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"


def _folders(out: Path, stage: str) -> list[Path]:
    return sorted(p for p in (out / stage).iterdir() if p.is_dir()) if (out / stage).is_dir() else []


def _manifests(out: Path, stage: str) -> list[Path]:
    return [p for p in _folders(out, stage) if (p / "manifest.json").is_file()]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}


def test_killed_in_each_stage_resumes_to_the_uninterrupted_result(tmp_path):
    out, clean_out = tmp_path / "killed", tmp_path / "clean"
    _kill_when(out, _in_align)
    assert not _manifests(out, "align") and _folders(out, "align"), "killed inside alignment"
    _kill_when(out, _in_finetune)
    assert len(_manifests(out, "align")) == 1 and not _manifests(out, "finetune") and _folders(out, "finetune")
    _kill_when(out, _in_evaluate, delay=0.3)
    assert len(_manifests(out, "finetune")) == 1 and not _manifests(out, "evaluate")
    resumed = json.loads(subprocess.run([*CMD, *KILLABLE, f"out_dir={out}"], env=ENV, capture_output=True,
                                        text=True, check=True).stdout)
    assert [(s["name"], s["cached"]) for s in resumed["stages"]] == [
        ("align", True), ("finetune", True), ("evaluate", False)]
    clean = run(load_config(overrides=[*KILLABLE, f"out_dir={clean_out}"]))
    assert resumed["metrics"] == clean["metrics"]  # HS, FA, refusal rates, per category: all equal
    for stage in ("align", "finetune", "evaluate"):  # every folder complete, none left half-written
        assert _folders(out, stage) == _manifests(out, stage) and len(_manifests(out, stage)) == 1
        mine, theirs = _manifests(out, stage)[0], _manifests(clean_out, stage)[0]
        assert _files(mine) == _files(theirs), stage  # no stale partial files
        m, c = (json.loads((f / "manifest.json").read_text())["metrics"] for f in (mine, theirs))
        assert {k: v for k, v in m.items() if "seconds" not in k} == {k: v for k, v in c.items() if "seconds" not in k}


def test_two_runs_at_once_compute_each_stage_once(tmp_path):
    out = tmp_path / "shared"  # empty: both runs race for the same align stage, then every later one
    procs = [subprocess.Popen([*CMD, *FAST, f"out_dir={out}"], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    a, b = results
    assert a["metrics"] == b["metrics"] and a["run_id"] == b["run_id"]
    names = [s["name"] for s in a["stages"]]
    assert names == [s["name"] for s in b["stages"]] == ["align", "evaluate_aligned", "finetune", "evaluate"]
    for sa, sb in zip(a["stages"], b["stages"]):  # each stage computed by exactly one of them
        assert sorted([sa["cached"], sb["cached"]]) == [False, True], sa["name"]
    for stage in ("align", "finetune"):
        assert len(_folders(out, stage)) == len(_manifests(out, stage)) == 1
    assert len(_folders(out, "evaluate")) == len(_manifests(out, "evaluate")) == 2
