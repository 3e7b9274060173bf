"""Sweeps and the bench: grids, up-front validation, resume after a kill, one store row per cell."""
from __future__ import annotations

import os
import signal
import json
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hftlab import store
from hftlab.config import ConfigError
from hftlab.report import summarise, value
from hftlab.sweep import expand, plan, run_cells, run_sweep


def test_expand_is_a_product_and_keeps_lists_whole():
    cells = expand(["a=1,2", "b=x,y,z", "finetune.lora_targets=[q_proj,v_proj]"])
    assert len(cells) == 6
    assert ["a=1", "b=x", "finetune.lora_targets=[q_proj,v_proj]"] in cells


def test_plan_validates_every_cell_first():
    with pytest.raises(ConfigError, match=r"attack\.ratio.*sweep cell: attack\.ratio=1\.5"):
        plan([], ["attack.ratio=0.1,1.5"])


def test_summary_groups_by_a_plugin_parameter_by_its_cli_name():
    """``hftlab sweep defense.perturb_aware=false,true`` groups its table by that key (it is stored
    under defense.params)."""
    rows = [{"config": {"defense": {"name": "booster", "params": {"perturb_aware": pa}}, "seed": s},
             "harmful_score": hs, "finetune_accuracy": 100.0}
            for pa, s, hs in [(False, 0, 90.0), (False, 1, 80.0), (True, 0, 30.0)]]
    header, body = summarise(rows, by=("defense.perturb_aware",))
    assert header[0] == "params"  # a defense's own parameters are shown per row, never as a shared column
    assert [b[0] for b in body] == ["perturb_aware=False", "perturb_aware=True"]
    assert [b[-1] for b in body] == ["2", "1"]
    assert value(rows[0], "defense.name") == "booster" and value(rows[0], "defense.missing") is None


def _store_rows(out: Path) -> list[dict]:
    return store.rows(out / "results.sqlite")


def test_report_never_averages_different_experiments():
    """``hftlab report`` groups by every config key that differs between runs except the seed: the
    bench's 10x-lr cells are not averaged into the default rows, and a defense's own parameters only
    split its rows when they differ for that defense."""
    from hftlab.report import auto_groups

    def row(defense, params, lr, seed, hs):
        return {"defense": defense, "config": {"defense": {"name": defense, "params": params}, "seed": seed,
                                               "finetune": {"lr": lr, "lora_targets": ["q_proj"]}},
                "harmful_score": hs, "finetune_accuracy": 100.0}

    rows = [row("sft", {}, 0.002, s, 70.0) for s in (0, 1)] + [row("sft", {}, 0.02, 0, 0.0)]
    rows += [row("vaccine", {"rho": 2.0}, 0.002, s, 60.0) for s in (0, 1)]
    rows += [row("booster", {"lam": 5.0, "perturb_aware": pa}, 0.002, 0, 90.0) for pa in (False, True)]
    by = auto_groups(rows)
    assert "finetune.lr" in by and "defense.perturb_aware" in by
    assert not {"seed", "defense.rho", "defense.lam", "finetune.lora_targets"} & set(by)
    header, body = summarise(rows, by=by)
    sft = [b for b in body if b[header.index("defense")] == "sft"]
    assert sorted((b[header.index("finetune.lr")], b[-1]) for b in sft) == [("0.002", "2"), ("0.02", "1")]


def test_a_new_organism_build_is_a_new_run(monkeypatch):
    """A run's id names the organism build it starts from: after the organism changes (a new version
    of hftlab), a sweep in an old folder reruns its cells instead of reporting the old build's
    results as done."""
    from hftlab.organism import build
    from hftlab.pipeline import run_key

    cell = plan([], ["seed=0"])[0]
    before = cell.run_id
    assert before == run_key(cell.cfg)
    monkeypatch.setitem(build.ORGANISM, "version", build.ORGANISM["version"] + 1)
    assert cell.run_id != before
    hub = plan([], ["seed=0", "model.name=some/model"])[0]
    assert hub.run_id != before


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


def _losses(result: dict) -> dict[str, float]:
    return {s["name"]: s["metrics"]["final_loss"] for s in result["stages"] if "final_loss" in s["metrics"]}


def test_pool_shares_alignment_and_matches_hftlab_run(fast_overrides, tmp_path):
    out = Path(fast_overrides[-1].split("=", 1)[1])
    cells = [*plan([], ["attack.ratio=0,0.5"], fast_overrides), *plan([], ["seed=1"], fast_overrides)]
    assert cells[0].align_group() == cells[1].align_group() != cells[2].align_group()
    results = run_cells(cells, jobs=1)  # one worker: the follower (ratio 0.5) runs third, after the others
    assert len(list(out.glob("align/*/manifest.json"))) == 2  # the shared alignment was computed once
    align = [next(s for s in r["stages"] if s["name"] == "align") for r in results]
    assert [a["cached"] for a in align] == [False, True, False]
    single = [*(o for o in fast_overrides if not o.startswith("out_dir=")), "attack.ratio=0.5", f"out_dir={tmp_path}/one"]
    proc = subprocess.run([sys.executable, "-m", "hftlab", "run", *single, "--json"], capture_output=True, text=True,
                          check=True)
    alone = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[1]["metrics"] == alone["metrics"] and results[1]["aligned"] == alone["aligned"]
    assert _losses(results[1]) == pytest.approx(_losses(alone), rel=1e-6)
    assert len(_store_rows(out)) == 3


def test_failed_cell_is_named_and_the_others_finish(fast_overrides, tmp_path):
    empty = tmp_path / "empty-model"  # a folder that exists (so preflight lets it through) but holds no model
    empty.mkdir()
    cells = plan([], [f"model.name=organism,{empty}"], fast_overrides)
    with pytest.raises(RuntimeError, match=r"^1 sweep cell\(s\) failed; first: cell .*model\.name=.*empty-model "
                                           r"failed: \w+: "):
        run_cells(cells, jobs=2)
    assert cells[0].result_path.is_file() and not cells[1].result_path.is_file()


def test_crashed_worker_is_reported_not_hung(fast_overrides):
    cells = plan([], [], fast_overrides)
    before = {p.pid for p in multiprocessing.active_children()}

    def kill_worker() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            workers = [p for p in multiprocessing.active_children() if p.pid not in before]
            if workers:
                time.sleep(1)
                os.kill(workers[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker, daemon=True)
    killer.start()
    with pytest.raises(RuntimeError, match=r"1 sweep cell\(s\) failed; first: cell .* failed: BrokenProcessPool"):
        run_cells(cells, jobs=1)
    killer.join()
    assert not cells[0].result_path.is_file()


def test_bench_writes_report_folder(fast_overrides, tmp_path):
    from hftlab.bench_suite import run_bench, tuned_is_paper

    # The shipped presets (read by the workers too): Lisa's differs from its paper setting (a tuned row),
    # RESTA's is the paper's (its tuned row is its paper row, run once).
    assert not tuned_is_paper("lisa") and tuned_is_paper("resta")
    out_dir = fast_overrides[-1].split("=", 1)[1]
    extra = [o for o in fast_overrides if not o.startswith("out_dir=")]
    report = run_bench(tmp_path / "report", seeds=(0, 1), jobs=2, runs_dir=out_dir, extra=extra,
                       defenses=["sft", "lisa", "resta"], worst_seeds=1)
    table = (report / "table.md").read_text()
    for name in ("sft", "lisa", "resta", "vs harmful ratio p", "Verdicts", "ΔHS vs SFT", "Worst-case attacker",
                 "lr x3", "epochs x3", "full FT", "Per seed"):
        assert name in table, name
    assert sum(line.startswith("| lisa") for line in table.splitlines()) >= 3  # verdict, ratios, per-seed rows
    verdicts = table.split("## Verdicts")[1].split("\n## ")[0]
    assert [line.split("|")[2].strip() for line in verdicts.splitlines() if line.startswith("| lisa")] == ["paper", "tuned"]
    assert [line.split("|")[2].strip() for line in verdicts.splitlines() if line.startswith("| resta")] == ["paper"]
    assert "kept the paper's setting for resta" in verdicts
    for f in ("table.csv", "table.tex", "per_seed.csv", "worst_case.csv", "hs_fa_scatter.png", "hs_vs_p.png",
              "overhead.png"):
        assert (report / f).stat().st_size > 0
