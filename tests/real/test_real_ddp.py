"""DDP through Accelerate with 2 CPU processes (gloo) on the organism: same metrics as 1 process, and only
the main process writes stage folders and the store."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

FAST = __import__("conftest").FAST
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_gloo_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    one = subprocess.run([sys.executable, "-m", "hftlab", "run", *FAST, f"out_dir={tmp_path / 'one'}", "--json"],
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    two = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
                          "-m", "hftlab", "run", *FAST, f"out_dir={tmp_path / 'two'}", "--json"],
                         env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads(one.stdout.strip().splitlines()[-1])
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 1  # only the main process prints the result
    b = json.loads(lines[0])
    # each process trained on half of every global batch: the main process saw about half the tokens
    ta, tb = a["stages"][0]["metrics"]["tokens"], b["stages"][0]["metrics"]["tokens"]
    assert 0.3 * ta < tb < 0.7 * ta
    for key in ("harmful_score", "finetune_accuracy"):
        assert abs(a[key] - b[key]) <= 12.5, (key, a[key], b[key])
    for stage, n in (("align", 1), ("finetune", 1), ("evaluate", 2)):  # evaluate: aligned and final models
        folders = [p for p in (tmp_path / "two" / stage).iterdir() if p.is_dir()]
        assert len(folders) == n and all((f / "manifest.json").is_file() for f in folders)
    with sqlite3.connect(tmp_path / "two" / "results.sqlite") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1
