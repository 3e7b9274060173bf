"""The pipeline end to end on the organism with tiny budgets: smoke, determinism, caching, resume, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hftlab.cli import main
from hftlab.config import load_config
from hftlab.pipeline import run


def test_smoke_all_stages(fast_overrides, capsys):
    result = run(load_config(overrides=fast_overrides))
    names = [s["name"] for s in result["stages"]]
    assert names == ["align", "evaluate_aligned", "finetune", "evaluate"]
    for key in ("harmful_score", "finetune_accuracy"):
        assert 0.0 <= result[key] <= 100.0
        assert 0.0 <= result["aligned"][key] <= 100.0
    run_dir = Path(result["run_dir"])
    assert (run_dir / "result.json").is_file()
    out = Path(fast_overrides[-1].split("=", 1)[1])
    ev = next(p for p in (out / "evaluate").iterdir() if p.is_dir())
    rows = (ev / "generations.jsonl").read_text().splitlines()
    assert len(rows) >= 32 and (ev / "scores.jsonl").is_file() and (ev / "metrics.json").is_file()
    manifest = json.loads((next(p for p in (out / "align").iterdir() if p.is_dir()) / "manifest.json").read_text())
    assert {"versions", "seconds", "config", "hash", "seed"} <= manifest.keys()
    for s in result["stages"]:  # the run folder names and links the stage folders it was computed from
        assert (run_dir / s["folder"] / "manifest.json").is_file() and not Path(s["folder"]).is_absolute()
        assert (run_dir / s["name"]).resolve() == (run_dir / s["folder"]).resolve()
    umask = os.umask(0)
    os.umask(umask)
    readable = 0o666 & ~umask  # what open() gives; safetensors and mkstemp wrote 0600
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {"model.safetensors", "manifest.json", "result.json"} <= {p.name for p in files}
    assert all(p.stat().st_mode & readable == readable for p in files), [p for p in files if p.stat().st_mode & 0o077 == 0]
    scores = [json.loads(line) for line in (ev / "scores.jsonl").read_text().splitlines()]
    benign = [s for s in scores if s["set"] == "benign"]
    assert any(s["kind"] == "task" for s in benign) and all(s["correct"] is not None for s in benign)


def test_same_seed_same_metrics_and_cache(fast_overrides, tmp_path):
    a = run(load_config(overrides=fast_overrides))
    b = run(load_config(overrides=fast_overrides))  # same out_dir: every stage cached
    assert all(s["cached"] for s in b["stages"])
    assert a["metrics"] == b["metrics"]
    other = [o for o in fast_overrides if not o.startswith("out_dir=")] + [f"out_dir={tmp_path / 'fresh'}"]
    c = run(load_config(overrides=other))  # recomputed from scratch
    assert not any(s["cached"] for s in c["stages"])
    assert c["metrics"] == a["metrics"]


def test_sweep_reuses_alignment(fast_overrides):
    run(load_config(overrides=fast_overrides))
    r = run(load_config(overrides=[*fast_overrides, "attack.ratio=0.5"]))
    cached = {s["name"]: s["cached"] for s in r["stages"]}
    assert cached == {"align": True, "evaluate_aligned": True, "finetune": False, "evaluate": False}


def test_cli_json(fast_overrides, capsys):
    assert main(["run", *fast_overrides, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert {"harmful_score", "finetune_accuracy", "aligned", "stages", "run_dir"} <= result.keys()
    assert [set(s) >= {"name", "seconds", "cached"} for s in result["stages"]]
    assert main(["report", "--store", str(Path(result["run_dir"]).parents[1] / "results.sqlite")]) == 0
    report = capsys.readouterr().out
    assert "harmful_score" in report and result["base_model"] in report  # the organism build is a column


def test_resume_after_kill_during_finetune(fast_overrides, tmp_path):
    """Kill -9 while fine-tuning; the rerun reuses alignment and gives the uninterrupted metrics."""
    slow = [o for o in fast_overrides if not o.startswith(("finetune.max_steps", "out_dir"))]
    slow += ["finetune.max_steps=150"]
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "hftlab", "run", *slow, "--json"]
    proc = subprocess.Popen([*cmd, f"out_dir={killed_dir}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((killed_dir / "finetune").glob("*/losses.jsonl")) if (killed_dir / "finetune").exists() else []
        if logs and logs[0].read_text().count("\n") >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((killed_dir / "finetune").glob("*/manifest.json")), "fine-tuning finished before the kill"
    resumed = json.loads(subprocess.run([*cmd, f"out_dir={killed_dir}"], env=env, capture_output=True,
                                        text=True, check=True).stdout)
    cached = {s["name"]: s["cached"] for s in resumed["stages"]}
    assert cached["align"] and not cached["finetune"]
    clean = run(load_config(overrides=[*slow, f"out_dir={clean_dir}"]))
    assert resumed["harmful_score"] == clean["harmful_score"]
    assert resumed["finetune_accuracy"] == clean["finetune_accuracy"]


@pytest.mark.parametrize("args, words", [
    (["run", "attack.ratio=1.5"], "attack.ratio"),
    (["run", "attack.n=-3"], "attack.n"),
    (["validate", "defense=nope"], "unknown defense"),
    (["run", "-c", "/nonexistent.yaml"], "not found"),
])
def test_cli_errors_are_one_line(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_help_and_list_do_not_import_torch():
    code = "import sys; from hftlab.cli import main; main(['list']); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
