"""The benchmark scripts run (tiny settings): bench/gpu_loop.py --tiny on CPU, bench/generation.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_gpu_loop_tiny_runs_both_loops():
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_loop.py"), "--tiny"], env=ENV, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert re.search(r"plain PyTorch\+PEFT\s+\d+ tokens/s", out), out
    assert re.search(r"hftlab loop\s+\d+ tokens/s", out), out
    assert float(re.search(r"ratio hftlab / plain: ([\d.]+)", out).group(1)) > 0


def test_generation_bench_outputs_match():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/generation.py"), "--n", "16", "--batch", "8",
                           "--max-new-tokens", "8"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "outputs that differ: 0/16" in proc.stdout
