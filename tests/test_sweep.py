"""Sweeps and the bench: grids, up-front validation, resume after a kill, one store row per cell."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hftlab import store
from hftlab.config import ConfigError
from hftlab.sweep import expand, plan, run_sweep


def test_expand_is_a_product_and_keeps_lists_whole():
    cells = expand(["a=1,2", "b=x,y,z", "finetune.lora_targets=[q_proj,v_proj]"])
    assert len(cells) == 6
    assert ["a=1", "b=x", "finetune.lora_targets=[q_proj,v_proj]"] in cells


def test_plan_validates_every_cell_first():
    with pytest.raises(ConfigError, match=r"attack\.ratio.*sweep cell: attack\.ratio=1\.5"):
        plan([], ["attack.ratio=0.1,1.5"])


def _store_rows(out: Path) -> list[dict]:
    return store.rows(out / "results.sqlite")


def test_sweep_reruns_nothing_and_stores_each_cell_once(fast_overrides):
    out = Path(fast_overrides[-1].split("=", 1)[1])
    results = run_sweep([], ["attack.ratio=0,0.5"], fast_overrides, jobs=2)
    assert [r["config"]["attack"]["ratio"] for r in results] == [0.0, 0.5]
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    again = run_sweep([], ["attack.ratio=0,0.5"], fast_overrides, jobs=2)
    assert [r["harmful_score"] for r in again] == [r["harmful_score"] for r in results]
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")} == stamps  # nothing re-ran
    assert len(_store_rows(out)) == 2


def test_killed_sweep_finishes_only_missing_cells(fast_overrides):
    out = Path(fast_overrides[-1].split("=", 1)[1])
    cmd = [sys.executable, "-m", "hftlab", "sweep", "attack.ratio=0,0.3,0.6", *fast_overrides, "--jobs", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("runs/*/result.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running cell
    proc.wait()
    done = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    assert 1 <= len(done) < 3, "the sweep was not interrupted midway"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    finished = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    assert len(finished) == 3
    assert all(finished[p] == t for p, t in done.items())  # finished cells were not redone
    rows = _store_rows(out)
    assert len(rows) == 3 and len({r["run_id"] for r in rows}) == 3


def test_bench_writes_report_folder(fast_overrides, tmp_path):
    from hftlab.bench_suite import run_bench

    out_dir = fast_overrides[-1].split("=", 1)[1]
    extra = [o for o in fast_overrides if not o.startswith("out_dir=")]
    report = run_bench(tmp_path / "report", seeds=(0,), jobs=2, runs_dir=out_dir, extra=extra,
                       defenses=["sft", "lisa", "resta"])
    table = (report / "table.md").read_text()
    for name in ("sft", "lisa", "resta", "vs harmful ratio p", "Stress regime"):
        assert name in table
    for f in ("table.csv", "table.tex", "hs_fa_scatter.png", "hs_vs_p.png", "overhead.png"):
        assert (report / f).stat().st_size > 0
