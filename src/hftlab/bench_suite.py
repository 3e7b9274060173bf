"""``hftlab bench``: the survey's comparison on the organism, in one command.

Runs (through :mod:`hftlab.sweep`, so cached and resumable; the three parts in one scheduler):
1. the main table: SFT and every registered defense at the default attack (p = 0.1, n = 1000), seeds;
2. the p-sweep: HS/FA vs p ∈ {0, 0.05, 0.1, 0.2} for SFT and the P1 defenses;
3. the stress regime: 10× the fine-tuning learning rate, and 3× its epochs, for SFT and the P1 defenses;
then writes a report folder: ``table.md`` (method, stage, HS, FA as mean ± std, time ratio vs SFT),
``table.csv``, ``table.tex``, and PNG plots (HS vs p per method, HS–FA scatter, overhead bars).
Step-time ratios come from the stage manifests of the same runs: the seconds per optimiser step of
the stage the method acts in, divided by SFT's for the same stage and seed.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from . import registry
from .artifacts import atomic_write_text
from .config import load_config
from .report import fmt_num, render, value
from .sweep import plan, run_cells

log = logging.getLogger(__name__)

# The core defenses of the survey's benchmark (those every paper compares against: "P1"), in stage order.
P1 = ("vaccine", "booster", "repnoise", "lisa", "safeinstr", "ldifs", "constrained-sft", "safelora", "antidote")
RATIOS = (0.0, 0.05, 0.1, 0.2)
STRESS = (("10x lr", "lr", 10), ("3x epochs", "epochs", 3))  # (column, finetune key, factor)


def _stage_time(result: dict[str, Any], stage: str) -> float | None:
    for s in result["stages"]:
        if s["name"] == stage:
            m = s.get("metrics") or {}
            if stage == "repair":
                return s["seconds"] if not s["cached"] else m.get("seconds")
            if m.get("steps"):
                return m["train_seconds"] / m["steps"]
    return None


def _acting_stage(defense: str) -> str:
    stages = getattr(registry.get("defense", defense), "stages", ())
    for s in ("align", "finetune", "repair"):
        if s in stages:
            return s
    return "finetune"


def overhead(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean ratio of each defense's per-step time (its acting stage) to SFT's, same seed."""
    sft = {value(r, "seed"): r for r in results if value(r, "defense.name") == "sft"}
    ratios: dict[str, list[float]] = {}
    for r in results:
        d = value(r, "defense.name")
        stage = _acting_stage(d)
        base = sft.get(value(r, "seed"))
        if base is None:
            continue
        if stage == "repair":
            mine, ref = _stage_time(r, "repair"), _stage_time(base, "finetune")
            ref = ref * next(s["metrics"]["steps"] for s in base["stages"] if s["name"] == "finetune") if ref else None
        else:
            mine, ref = _stage_time(r, stage), _stage_time(base, stage)
        if mine and ref:
            ratios.setdefault(d, []).append(mine / ref)
    return {d: statistics.mean(v) for d, v in ratios.items()}


def main_table(results: Sequence[dict[str, Any]], ratios: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "stage", "HS (%)", "FA (%)", "time ratio vs SFT", "seeds"]
    body = []
    for name in registry.names("defense"):
        rs = [r for r in results if value(r, "defense.name") == name]
        if not rs:
            continue
        stage = registry.entry("defense", name).stage
        ratio = ratios.get(name)
        body.append([name, stage, fmt_num([r["harmful_score"] for r in rs]),
                     fmt_num([r["finetune_accuracy"] for r in rs]),
                     "1.00" if name == "sft" else (f"{ratio:.2f}" + (" (repair/FT run)" if stage == "repair" else "")
                                                   if ratio else "–"), str(len(rs))])
    return header, body


def run_bench(out: Path, seeds: Sequence[int], jobs: int, runs_dir: str, extra: Sequence[str] = (),
              sweeps: bool = True, defenses: Sequence[str] | None = None, executor: Any = None) -> Path:
    """Run the suite (every registered defense, or ``defenses``) and write the report folder; ``executor``
    (:mod:`hftlab.executors`) says where its cells run (default: local worker processes)."""
    start = time.time()
    fixed = [f"out_dir={runs_dir}", *extra]
    defenses = list(defenses or registry.names("defense"))
    if "sft" not in defenses:
        defenses.insert(0, "sft")
    p1 = ["sft", *[d for d in P1 if d in defenses]]
    seed_axis = f"seed={','.join(map(str, seeds))}"
    main_cells = plan([], [f"defense={','.join(defenses)}", seed_axis], fixed)
    curve_cells: list = []
    stress_cells: list[list] = []
    if sweeps:
        curve_cells = plan([], [f"defense={','.join(p1)}", f"attack.ratio={','.join(map(str, RATIOS))}",
                                f"seed={seeds[0]}"], fixed)
        ft = load_config(overrides=list(extra)).finetune
        stress_cells = [plan([], [f"defense={','.join(p1)}", f"seed={seeds[0]}"],
                             [*fixed, f"finetune.{key}={getattr(ft, key) * k:g}"]) for _, key, k in STRESS]
    # One scheduler for every part (no barrier between them); shared cells (p = 0.1) run once.
    results = run_cells([*main_cells, *curve_cells, *sum(stress_cells, [])], [], jobs, desc="bench",
                        executor=executor)
    main, curves = results[:len(main_cells)], results[len(main_cells):len(main_cells) + len(curve_cells)]
    rest = results[len(main_cells) + len(curve_cells):]
    stress = [rest[i * len(p1):(i + 1) * len(p1)] for i in range(len(stress_cells))]
    ratios = overhead(main)
    out.mkdir(parents=True, exist_ok=True)
    header, body = main_table(main, ratios)
    attack = load_config(overrides=list(extra)).attack
    md = [f"# hftlab bench on the organism\n", f"{attack.name}, p = {attack.ratio}, n = {attack.n}, seeds {list(seeds)}; "
          f"wall time {time.time() - start:.0f} s\n", "## Main table\n", render(header, body)]
    if curves:
        rows = [[d, *(fmt_num([r["harmful_score"] for r in curves if value(r, "defense.name") == d
                                and value(r, "attack.ratio") == p]) for p in RATIOS)] for d in p1]
        md += [f"\n## HS (%) vs harmful ratio p (seed {seeds[0]})\n", render(["method", *map(str, RATIOS)], rows)]
    if stress:
        base = {value(r, "defense.name"): r for r in main if value(r, "seed") == seeds[0]}
        cols = [base] + [{value(r, "defense.name"): r for r in part} for part in stress]
        rows = [[d, *(f"{c[d]['harmful_score']:.1f} / {c[d]['finetune_accuracy']:.1f}" if d in c else "–"
                      for c in cols)] for d in p1]
        md += [f"\n## Stress regime: HS / FA (%) (seed {seeds[0]})\n",
               render(["method", "default", *(name for name, _, _ in STRESS)], rows)]
    atomic_write_text(out / "table.md", "".join(md))
    atomic_write_text(out / "table.csv", render(header, body, "csv"))
    atomic_write_text(out / "table.tex", render(header, body, "latex"))
    from .plots import plot_bench

    plot_bench(out, main, curves, ratios, p1, RATIOS)
    return out
