"""Executors: a sweep through Ray or Slurm (submitit's local cluster) stores the same rows as the local
workers, keeps the dependency order, and resumes; the store loses no row under 8 concurrent writers."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hftlab import store
from hftlab.config import ConfigError
from hftlab.executors import make
from hftlab.sweep import run_sweep
from fast_overrides import FAST

GRID = ["attack.ratio=0,0.5"]  # 2 cells sharing one alignment: a leader and its follower
# Smaller than FAST still: these tests run the grid once per executor.
TINY = [*FAST, "align.max_steps=3", "finetune.max_steps=3", "eval.n_harmful=8", "eval.n_task=8",
        "eval.max_new_tokens=8"]


def _rows(out: Path) -> dict[tuple, dict]:
    """The store's rows keyed by ratio: metrics and HS/FA, which every executor must agree on."""
    return {r["ratio"]: {k: r[k] for k in ("harmful_score", "finetune_accuracy", "metrics",
                                                          "aligned_harmful_score", "aligned_finetune_accuracy")}
            for r in store.rows(out / "results.sqlite")}


def _sweep(out: Path, executor=None, jobs: int = 1) -> list[dict]:
    return run_sweep([], GRID, [*TINY, f"out_dir={out}"], jobs=jobs, executor=executor)


def _aligned_once(out: Path, results: list[dict]) -> None:
    """The alignment ran once; the follower found it cached (it ran after its leader)."""
    assert len(list(out.glob("align/*/manifest.json"))) == 1
    cached = sorted(next(s["cached"] for s in r["stages"] if s["name"] == "align") for r in results)
    assert cached == [False, True]


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory) -> dict[tuple, dict]:
    """The reference: the grid on the local worker processes."""
    out = tmp_path_factory.mktemp("local") / "runs"
    _sweep(out)
    rows = _rows(out)
    assert len(rows) == 2
    return rows


def test_ray_sweep_matches_local(local_rows, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        out = tmp_path / "runs"
        results = _sweep(out, make("ray"))
        assert ray.is_initialized()  # the executor used the running cluster and left it running
    finally:
        ray.shutdown()
    assert _rows(out) == local_rows
    _aligned_once(out, results)
    assert len(list(out.glob("runs/*/result.json"))) == 2


def test_slurm_sweep_matches_local_and_resumes(local_rows, tmp_path):
    pytest.importorskip("submitit")
    out, jobs = tmp_path / "runs", tmp_path / "jobs"
    # One job per alignment group: the leader, then its follower.
    results = _sweep(out, make("slurm", cluster="local", folder=str(jobs / "group"), per="group", time_min=10))
    assert _rows(out) == local_rows
    _aligned_once(out, results)
    assert len(list((jobs / "group").glob("*/*_submitted.pkl"))) == 1
    # Resubmitted after one cell's result is lost: one job per cell, for that cell only.
    lost = Path(results[1]["run_dir"]) / "result.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    again = _sweep(out, make("slurm", cluster="local", folder=str(jobs / "cell"), per="cell"))
    assert len(list((jobs / "cell").glob("*/*_submitted.pkl"))) == 1
    assert lost.is_file() and {p: p.stat().st_mtime for p in kept} == kept  # finished cells not redone
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
    assert _rows(out) == local_rows


def test_executor_flags():
    from hftlab.cli import build_parser
    from hftlab.executors import from_args

    args = build_parser().parse_args(["sweep", "--executor", "slurm", "--partition", "gpu", "--time", "30",
                                      "--gpus", "1", "--slurm-per", "group", "--slurm-opt", "account=lab", "seed=0,1"])
    ex = from_args(args)
    assert (ex.name, ex.partition, ex.time_min, ex.gpus, ex.per, ex.extra) == ("slurm", "gpu", 30, 1, "group",
                                                                               {"account": "lab"})
    ray = from_args(build_parser().parse_args(["bench", "--executor", "ray", "--address", "auto"]))
    assert (ray.name, ray.address) == ("ray", "auto")
    with pytest.raises(ConfigError, match=r"--slurm-opt 'account': expected KEY=VALUE"):
        from_args(build_parser().parse_args(["sweep", "--executor", "slurm", "--slurm-opt", "account"]))


def test_unknown_executor_options_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"--executor: 'mpi' is not one of local, ray, slurm"):
        make("mpi")
    with pytest.raises(ConfigError, match=r"--slurm-per: 'node'"):
        make("slurm", per="node")


WRITER = """
import sys, time
from hftlab import store
path, me, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))  # every writer starts at once, on a store that does not exist yet
for i in range(n):
    cfg = {"defense": {"name": "sft"}, "attack": {"name": "harmful-mix", "ratio": 0.1, "n": 10}, "task": "t",
           "seed": me}
    res = {"base_model": "m", "harmful_score": float(i), "finetune_accuracy": float(me), "aligned": {},
           "stages": [{"name": "align", "seconds": 0.0}], "metrics": {"i": i}}
    store.record(path, f"w{me}-{i}", cfg, res)
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_store_loses_no_row_under_concurrent_writers(tmp_path, journal):
    path, writers, n = tmp_path / "deep" / "results.sqlite", 8, 25
    start = time.time() + 2.0
    env = {**os.environ, "HFTLAB_STORE_JOURNAL": journal}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(n), str(start)],
                              stderr=subprocess.PIPE, text=True, env=env) for w in range(writers)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, errors
    rows = store.rows(path)
    assert len(rows) == writers * n
    assert {(r["seed"], r["metrics"]["i"]) for r in rows} == {(w, i) for w in range(writers) for i in range(n)}
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == journal  # WAL persists in the file; delete is the default
    con.close()


def test_extras_are_imported_only_when_used():
    """``hftlab sweep --help``, the executors' flags and a run's config never import Ray, submitit or the trackers."""
    code = ("import sys; from hftlab import cli, executors, tracking; from hftlab.config import load_config; "
            "cli.build_parser().parse_args(['sweep', '--executor', 'ray', 'seed=0,1']); load_config(); "
            "executors.make('local'); print(sorted(m for m in ('ray', 'submitit', 'wandb', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
