"""Attacks × defenses on the organism: every registered attack against SFT and the core (P1) defenses,
with and without the provider's guardrail, paired with SFT under the same attack at the same seed.

Run: ``python -m bench.attacks_defenses --jobs 1 --seeds 0,1,2 --out reports/attacks [--runs runs]
[--attacks a,b] [--defenses d,e] [--guardrail both|off|on] [--no-run] [KEY=VALUE …]``.

Each attack runs at its defaults (p = ``attack.ratio`` = 0.1, n = 1000, its own parameters as in its
docstring), each defense at its paper defaults (``defense=<name>``, as ``hftlab bench``). The cells go
through :mod:`hftlab.sweep` (cached, resumable): an alignment stage depends on the defense and the seed,
never on the attack, so it is computed once and every further attack costs fine-tuning and evaluation
only. ``--no-run`` writes the tables from the cells already finished (the others are left out).

Per (attack, guardrail, defense) the table gives HS and FA (plain evaluation), the attacker's HS (the
attack's own view: HS with the trigger for ``backdoor-trigger``, decoded HS under the cipher for
``cipher``, HS under the AOA system prompt and prefix for ``identity-shift``; the plain HS for the
others), the guardrail's leakage (the percentage of harmful samples it lets through), and the mean
paired differences to SFT under the same attack and guardrail with their 95 % t intervals
(:mod:`hftlab.verdict`); the verdict is taken on the attacker's HS. Writes ``table.md``, ``table.csv``
and ``per_seed.csv`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hftlab import registry
from hftlab.artifacts import atomic_write_text
from hftlab.bench_suite import P1
from hftlab.errors import UserError
from hftlab.report import render
from hftlab.sweep import Cell, plan, run_cells
from hftlab.verdict import Interval, mean_interval, paired, verdict

log = logging.getLogger(__name__)

ATTACKS = ("harmful-mix", "identity-shift", "backdoor-trigger", "cipher", "benign-select", "virus")
# SFT and the core defenses of the survey's benchmark (the bench's P1), in stage order.
DEFENSES = ("sft", *P1)
VIEWS = {"identity-shift": "aoa", "backdoor-trigger": "trigger", "cipher": "cipher"}
GUARD = "organism-guard"


@dataclass(frozen=True)
class Key:
    """One cell of the grid."""

    attack: str
    defense: str
    guard: bool
    seed: int


def _names(kind: str, names: Sequence[str]) -> list[str]:
    known = registry.names(kind)
    bad = [n for n in names if n not in known]
    if bad:
        raise UserError(f"--{kind}s: unknown {kind} {', '.join(bad)} (known: {', '.join(known)})")
    return list(names)


def plan_grid(attacks: Sequence[str], defenses: Sequence[str], seeds: Sequence[int],
              guard_modes: Sequence[bool] = (False, True), runs: str = "runs",
              extra: Sequence[str] = ()) -> list[tuple[Key, Cell]]:
    """Every cell, validated: attacks × guardrail modes × defenses × seeds (SFT always included)."""
    attacks = _names("attack", attacks)
    defenses = _names("defense", ["sft", *[d for d in defenses if d != "sft"]])
    out = []
    for attack in attacks:
        for guard in guard_modes:
            fixed = [f"out_dir={runs}", f"attack={attack}", *([f"guardrail.name={GUARD}"] if guard else []),
                     *extra]
            for cell in plan([], [f"defense={','.join(defenses)}", f"seed={','.join(map(str, seeds))}"], fixed):
                out.append((Key(attack, cell.cfg.defense.name, guard, cell.cfg.seed), cell))
    return out


def collect(grid: Sequence[tuple[Key, Cell]], jobs: int = 1, run: bool = True,
            reuse: bool = False) -> dict[Key, dict[str, Any]]:
    """Run the missing cells (unless ``run`` is false) and read every finished one. A cell without a
    result of its own run id takes the newest run of the same resolved config (:func:`same_config`);
    with ``reuse``, such a cell is not run again."""
    if run:
        todo = [c for k, c in grid if not c.result_path.is_file()]
        if reuse:
            done = same_config([(k, c) for k, c in grid if not c.result_path.is_file()])
            todo = [c for k, c in grid if not c.result_path.is_file() and k not in done]
        try:
            run_cells(todo, [], jobs, desc="attacks x defenses")
        except (RuntimeError, OSError) as e:  # failed cells are left out of the tables, named in the log
            log.error("%s", e)
    out = {k: json.loads(c.result_path.read_text()) for k, c in grid if c.result_path.is_file()}
    missing = [(k, c) for k, c in grid if k not in out]
    if missing:
        found = same_config(missing)
        if found:
            log.warning("%d cells read from a run of the same config computed with other plugin code "
                        "(an edit of a method's file, or of a module it imports, changes the run id)", len(found))
        out.update({k: {**r, "other_code": True} for k, r in found.items()})
    return out


# Plugin parameters renamed since runs were stored (old name -> new name; same meaning and values).
RENAMED = {"lamb": "lam"}


def _normal(config: dict[str, Any] | None) -> str:
    """A resolved config as a comparable string, with renamed plugin parameters under their new names."""
    config = dict(config or {})
    for section in ("attack", "defense"):
        if isinstance(config.get(section), dict) and isinstance(config[section].get("params"), dict):
            params = {RENAMED.get(k, k): v for k, v in config[section]["params"].items()}
            config[section] = {**config[section], "params": params}
    return json.dumps(config, sort_keys=True)


def same_config(cells: Sequence[tuple[Key, Cell]]) -> dict[Key, dict[str, Any]]:
    """For cells without a result: the newest finished run of the same resolved config in their runs
    folder (plugin parameters compared under their current names), whatever the plugin code it ran with."""
    from hftlab.pipeline import experiment

    wanted: dict[str, list[Key]] = {}
    folders = set()
    for k, c in cells:
        wanted.setdefault(_normal(experiment(c.cfg)), []).append(k)
        folders.add(c.result_path.parent.parent)
    out: dict[Key, dict[str, Any]] = {}
    paths = sorted((p for f in folders for p in f.glob("*/result.json")), key=lambda p: p.stat().st_mtime)
    for path in paths:  # oldest first: a newer run of the same config replaces it
        result = json.loads(path.read_text())
        for k in wanted.get(_normal(result.get("config")), []):
            out[k] = result
    return out


def cell_metrics(result: dict[str, Any], attack: str) -> dict[str, float | None]:
    """HS, FA, the attacker's HS (its view, else the plain HS) and the guardrail's leakage of one run."""
    m = result.get("metrics", {})
    view = m.get("views", {}).get(VIEWS.get(attack, ""), {})
    guard = m.get("guardrail") or {}
    return {"hs": result["harmful_score"], "fa": result["finetune_accuracy"],
            "hs_attacker": view.get("harmful_score", result["harmful_score"]),
            "fa_view": view.get("finetune_accuracy"), "leakage": guard.get("leakage"),
            "benign_dropped": guard.get("benign_dropped"), "n_kept": guard.get("n_kept")}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def summarise(results: dict[Key, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, guardrail, defense): means over seeds and paired intervals to SFT."""
    per = {k: cell_metrics(r, k.attack) for k, r in results.items()}
    groups: dict[tuple[str, bool, str], dict[int, dict[str, Any]]] = {}
    for k, m in per.items():
        groups.setdefault((k.attack, k.guard, k.defense), {})[k.seed] = m
    a_order = {a: i for i, a in enumerate(registry.names("attack"))}
    d_order = {d: i for i, d in enumerate(DEFENSES)}
    rows = []
    for (attack, guard, defense), by_seed in sorted(groups.items(), key=lambda kv: (
            a_order.get(kv[0][0], 99), kv[0][1], d_order.get(kv[0][2], 99), kv[0][2])):
        row: dict[str, Any] = {"attack": attack, "guard": guard, "defense": defense, "seeds": sorted(by_seed)}
        for key in ("hs", "fa", "hs_attacker", "fa_view", "leakage", "benign_dropped"):
            row[key] = _mean([m[key] for m in by_seed.values()])
        row["hs_seeds"] = [by_seed[s]["hs_attacker"] for s in sorted(by_seed)]
        sft = groups.get((attack, guard, "sft"))
        if defense != "sft" and sft:
            for key in ("hs", "hs_attacker", "fa"):
                diffs = paired({s: m[key] for s, m in by_seed.items()}, {s: m[key] for s, m in sft.items()})
                if diffs:
                    row["d_" + key] = mean_interval(diffs)
            if "d_hs_attacker" in row:
                row["verdict"] = verdict(row["d_hs_attacker"], row["d_fa"])
        rows.append(row)
    return rows


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _i(v: Interval | None) -> str:
    return "–" if v is None else v.fmt()


HEADER = ["attack", "guardrail", "defense", "seeds", "HS (%)", "attacker HS (%)", "FA (%)", "leakage (%)",
          "ΔHS vs SFT", "Δ attacker HS vs SFT", "ΔFA vs SFT", "verdict", "attacker HS per seed"]


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary as table cells (intervals: mean [95 % t interval] of the paired differences)."""
    body = []
    for r in rows:
        view = VIEWS.get(r["attack"])
        body.append([r["attack"] + (f" ({view})" if view else ""), GUARD if r["guard"] else "off", r["defense"],
                     str(len(r["seeds"])), _f(r["hs"]), _f(r["hs_attacker"]), _f(r["fa"]), _f(r["leakage"]),
                     _i(r.get("d_hs")), _i(r.get("d_hs_attacker")), _i(r.get("d_fa")),
                     r.get("verdict", "reference" if r["defense"] == "sft" else "–"),
                     " / ".join(_f(v) for v in r["hs_seeds"])])
    return HEADER, body


def per_seed(results: dict[Key, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["attack", "guardrail", "defense", "seed", "HS", "attacker HS", "FA", "FA under the view",
              "leakage", "benign dropped", "samples kept", "run id", "code"]
    body = []
    for k in sorted(results, key=lambda k: (k.attack, k.guard, k.defense, k.seed)):
        m = cell_metrics(results[k], k.attack)
        body.append([k.attack, GUARD if k.guard else "off", k.defense, str(k.seed), _f(m["hs"]),
                     _f(m["hs_attacker"]), _f(m["fa"]), _f(m["fa_view"]), _f(m["leakage"]),
                     _f(m["benign_dropped"]), "–" if m["n_kept"] is None else str(m["n_kept"]),
                     results[k].get("run_id", ""), "earlier" if results[k].get("other_code") else "current"])
    return header, body


def write_report(out: Path, results: dict[Key, dict[str, Any]], planned: int, seconds: float) -> Path:
    rows = summarise(results)
    header, body = table(rows)
    sheader, sbody = per_seed(results)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Attacks × defenses on the organism\n\n",
          f"{len(results)} of {planned} planned cells finished; wall time {seconds:.0f} s. "
          "Every attack at its defaults (p = 0.1, n = 1000), every defense at its paper defaults. "
          "attacker HS: HS under the attack's view (in brackets after its name), else the plain HS. "
          "Δ: mean paired difference to SFT under the same attack and guardrail at the same seed, "
          "[95 % t interval]; the verdict is on the attacker's HS and FA. A per-seed row with code "
          "'earlier' is a run of the same config computed before an edit of the plugin code it fingerprints.\n\n",
          render(header, body), "\n## Per seed\n\n", render(sheader, sbody)]
    atomic_write_text(out / "table.md", "".join(md))
    atomic_write_text(out / "table.csv", render(header, body, "csv"))
    atomic_write_text(out / "per_seed.csv", render(sheader, sbody, "csv"))
    return out / "table.md"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="reports/attacks")
    ap.add_argument("--runs", default="runs", help="out_dir of the runs (shared stage cache)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--guardrail", choices=("both", "off", "on"), default="both")
    ap.add_argument("--no-run", action="store_true", help="tables from the cells already finished")
    ap.add_argument("--reuse", action="store_true",
                    help="do not rerun a cell whose config has a finished run under other plugin code")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every cell")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.guardrail]
    start = time.time()
    grid = plan_grid([a for a in args.attacks.split(",") if a], [d for d in args.defenses.split(",") if d],
                     seeds, modes, args.runs, args.overrides)
    results = collect(grid, args.jobs, run=not args.no_run, reuse=args.reuse)
    path = write_report(Path(args.out), results, len(grid), time.time() - start)
    log.info("wrote %s (%d of %d cells)", path, len(results), len(grid))
    return path


if __name__ == "__main__":
    import sys

    try:
        main()
    except UserError as e:
        sys.exit(f"attacks_defenses: error: {e}")
