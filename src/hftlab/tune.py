"""``hftlab tune``: calibrate each defense's strength on the organism, on validation seeds and prompts.

A defense's strength grid is written in its paper-defaults file, ``configs/defenses/<name>.yaml``, under
``tune:`` — a mapping (parameter → values: their product) or a list of settings — and the paper's own
setting (the file's ``defense:`` values) is always one of the points. Every point runs on the
**validation seeds** (default 100, 101, 102: never the report's seeds) and is scored on the **validation
prompts** (``eval.split=validation``: held-out harmful and task prompts after the test ones, disjoint
from them). SFT runs on the same seeds. One written rule picks the setting
(:func:`hftlab.verdict.select`): the lowest mean validation HS among the settings whose mean validation
FA is within 5 points of SFT's; if none qualifies, the paper's setting is kept and the file says so.

The result goes to ``configs/organism/tuned/<name>.yaml``: the chosen values under ``defense:`` (so
``defense=<name> defense.preset=tuned`` runs them) and the whole grid's table under ``tune:``. Cells run
on the sweep engine: cached, resumable, in parallel, with progress.
"""
from __future__ import annotations

import itertools
import logging
import statistics
from pathlib import Path
from typing import Any, Sequence

import yaml

from .artifacts import atomic_write_text
from .config import ConfigError, load_flat, tuned_preset_path
from .config_files import SHIPPED
from .sweep import Cell, plan, run_cells
from .verdict import FA_MARGIN, Setting, select

log = logging.getLogger(__name__)

VALIDATION_SEEDS = (100, 101, 102)
RULE = (f"lowest mean validation HS among the settings whose mean validation FA is within {FA_MARGIN:g} "
        f"points of SFT's; none qualifying: the paper's setting")


def defaults_file(defense: str) -> Path:
    return SHIPPED / "defenses" / f"{defense}.yaml"


def grid(defense: str) -> list[dict[str, Any]]:
    """The settings to try: the paper's (the file's ``defense:`` values of the grid's keys) first, then the
    ``tune:`` points (a mapping's product, or a list of settings), without repeats."""
    path = defaults_file(defense)
    if not path.is_file():
        raise ConfigError(f"tune: defense '{defense}' has no paper-defaults file {path.name} in configs/defenses/")
    raw = yaml.safe_load(path.read_text()) or {}
    spec = raw.get("tune")
    if not spec:
        raise ConfigError(f"tune: {path.name} has no 'tune:' grid for defense '{defense}' ({path})")
    if isinstance(spec, dict):
        keys = list(spec)
        bad = [k for k in keys if not isinstance(spec[k], list) or not spec[k]]
        if bad:
            raise ConfigError(f"tune.{bad[0]}: expected a non-empty list of values ({path})")
        points = [dict(zip(keys, vals)) for vals in itertools.product(*(spec[k] for k in keys))]
    elif isinstance(spec, list) and all(isinstance(p, dict) for p in spec):
        points = [dict(p) for p in spec]
    else:
        raise ConfigError(f"tune: expected a mapping of lists or a list of settings ({path})")
    paper_values = {k.split(".", 1)[1]: v for k, (v, _) in load_flat(path).items()
                    if k.startswith("defense.") and k != "defense.name"}
    keys = sorted({k for p in points for k in p})
    paper = {k: paper_values[k] for k in keys if k in paper_values}
    out: list[dict[str, Any]] = []
    for p in [paper, *points]:
        full = {**paper, **p}
        if full not in out:
            out.append(full)
    return out


def _overrides(defense: str, setting: dict[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()

    return [f"defense={defense}", *(f"defense.{k}={fmt(v)}" for k, v in setting.items())]


def tunable() -> list[str]:
    """Registered defenses whose paper-defaults file has a ``tune:`` grid."""
    from . import registry

    out = []
    for name in registry.names("defense"):
        path = defaults_file(name)
        if path.is_file() and (yaml.safe_load(path.read_text()) or {}).get("tune"):
            out.append(name)
    return out


def plan_tune(defenses: Sequence[str], seeds: Sequence[int], fixed: Sequence[str]) -> dict[str, list[list[Cell]]]:
    """Cells per defense and grid point (one per seed); "sft" holds SFT's cells (one point)."""
    seed_axis = [f"seed={','.join(map(str, seeds))}"]
    base = [*fixed, "eval.split=validation"]
    cells = {"sft": [plan([], seed_axis, [*base, "defense=sft"])]}
    for d in defenses:
        cells[d] = [plan([], seed_axis, [*base, *_overrides(d, s)]) for s in grid(d)]
    return cells


def _mean(results: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in results)


def choose(defense: str, settings: list[dict[str, Any]], results: list[list[dict[str, Any]]],
           sft: list[dict[str, Any]]) -> dict[str, Any]:
    """The table of the grid and the chosen setting (by :data:`RULE`)."""
    sft_fa, sft_hs = _mean(sft, "finetune_accuracy"), _mean(sft, "harmful_score")
    points = [Setting(s, _mean(rs, "harmful_score"), _mean(rs, "finetune_accuracy")) for s, rs in zip(settings, results)]
    pick = select(points, sft_fa)
    rows = [{"setting": dict(s), "paper": i == 0, "hs": round(p.hs, 2), "fa": round(p.fa, 2),
             "hs_seeds": [round(r["harmful_score"], 2) for r in rs], "fa_seeds": [round(r["finetune_accuracy"], 2) for r in rs],
             "fa_kept": p.fa >= sft_fa - FA_MARGIN, "chosen": i == (0 if pick is None else pick)}
            for i, (s, p, rs) in enumerate(zip(settings, points, results))]
    return {"defense": defense, "chosen": dict(settings[0 if pick is None else pick]),
            "kept_paper": pick is None, "sft": {"hs": round(sft_hs, 2), "fa": round(sft_fa, 2)}, "grid": rows}


def write_preset(table: dict[str, Any], seeds: Sequence[int], fixed: Sequence[str], path: Path | None = None) -> Path:
    """``configs/organism/tuned/<name>.yaml``: the chosen values and the grid's table."""
    name = table["defense"]
    path = path or tuned_preset_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ("no setting kept FA within the margin: the paper's setting is kept" if table["kept_paper"]
            else "the chosen setting, by the rule below")
    head = (f"# {name}, calibrated on the organism by `hftlab tune {name}`: {note}.\n"
            f"# Use: hftlab run defense={name} defense.preset=tuned\n")
    body = {"defense": {"name": name, **table["chosen"]},
            "tune": {"rule": RULE, "validation_seeds": list(seeds), "split": "validation",
                     "overrides": list(fixed), "sft": table["sft"], "grid": table["grid"]}}
    atomic_write_text(path, head + yaml.safe_dump(body, sort_keys=False, width=110))
    return path


def run_tune(defenses: Sequence[str], seeds: Sequence[int] = VALIDATION_SEEDS, jobs: int = 1,
             runs_dir: str = "runs", extra: Sequence[str] = (), out_root: Path | None = None,
             executor: Any = None) -> dict[str, dict[str, Any]]:
    """Run every grid point of ``defenses`` (and SFT) on ``seeds``; write one preset file per defense."""
    fixed = [f"out_dir={runs_dir}", *extra]
    cells = plan_tune(defenses, seeds, fixed)
    flat = [c for groups in cells.values() for g in groups for c in g]
    log.info("tune: %d defenses, %d settings, seeds %s: %d cells", len(defenses),
             sum(len(v) for k, v in cells.items() if k != "sft"), list(seeds), len(flat))
    results = iter(run_cells(flat, [], jobs, desc="tune", executor=executor))
    by = {k: [[next(results) for _ in g] for g in groups] for k, groups in cells.items()}
    tables = {}
    for d in defenses:
        table = choose(d, grid(d), by[d], by["sft"][0])
        path = write_preset(table, seeds, extra, out_root / f"{d}.yaml" if out_root else None)
        log.info("tune: %s -> %s (%s)", d, table["chosen"], path)
        tables[d] = table
    return tables


def summary(tables: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: per defense, each setting's validation HS / FA, the chosen one marked."""
    from .report import render

    rows = []
    for t in list(tables.values())[:1]:  # every defense is compared with the same SFT cells
        rows.append(["sft", "", f"{t['sft']['hs']:.1f}", f"{t['sft']['fa']:.1f}", "reference"])
    for d, t in tables.items():
        for r in t["grid"]:
            setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
            mark = ("chosen" if r["chosen"] else "") + (" (paper)" if r["paper"] else "")
            rows.append([d, setting, f"{r['hs']:.1f}", f"{r['fa']:.1f}", mark.strip()])
    return render(["defense", "setting", "val HS (%)", "val FA (%)", ""], rows)
