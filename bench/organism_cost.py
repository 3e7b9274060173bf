"""Cost of the organism on this machine: build, alignment, and one run with alignment cached.

    python -m bench.organism_cost

Runs ``hftlab run --json`` twice in a fresh run folder (the second with another harmful ratio, so it
reuses the alignment) and prints the stage times and the peak resident memory of each run.
The organism's cost targets: run with alignment cached ≤ 60 s, alignment ≤ 2 min, peak ≤ 2 GB.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(out: Path, *overrides: str) -> tuple[dict, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "hftlab", "run", f"out_dir={out}", *overrides, "--json"],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    wall = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over finished children
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, max(peak, before) / 1024


def main(argv: list[str] | None = None) -> None:
    from hftlab.artifacts import read_json
    from hftlab.organism.build import ensure_organism

    start = time.time()
    folder = ensure_organism()
    build = read_json(folder / "manifest.json")
    print(f"organism: {build['parameters']:,} parameters, built in {build['seconds']:.0f} s "
          f"(this call: {time.time() - start:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        first, wall1, mem1 = run(Path(tmp))
        second, wall2, mem2 = run(Path(tmp), "attack.ratio=0.05")
    rows = [("run 1 (aligns)", first, wall1, mem1), ("run 2 (alignment cached)", second, wall2, mem2)]
    print(f"{'run':<26} {'wall s':>7} {'peak MB':>8}  stages (s)")
    for name, res, wall, mem in rows:
        stages = ", ".join(f"{s['name']} {s['seconds']:.1f}{' (cached)' if s['cached'] else ''}" for s in res["stages"])
        print(f"{name:<26} {wall:7.1f} {mem:8.0f}  {stages}")
    align = next(s["seconds"] for s in first["stages"] if s["name"] == "align")
    print(f"\nalignment {align:.0f} s (target <= 120); run with alignment cached {wall2:.0f} s (target <= 60); "
          f"peak {max(mem1, mem2):.0f} MB (target <= 2048)")


if __name__ == "__main__":
    main()
