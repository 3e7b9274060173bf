"""``hftlab sweep``: a grid over config keys, cells on a pool of worker processes, resumable.

``hftlab sweep defense=sft,vaccine attack.ratio=0,0.1 seed=0,1,2 --jobs 2`` runs the product of the
comma-separated values. Every cell is validated before anything runs; a cell whose run folder already
holds ``result.json`` is skipped, so a killed sweep reruns only its missing cells. Cells run in-process
in ``jobs`` persistent spawned workers (one torch thread each; torch is imported once per worker, not
once per cell), and each writes a row in the SQLite store (keyed by run id, so each cell is stored once).
Cells sharing an alignment run it once: the first cell of each alignment group (its leader) runs first,
alignment-stage defenses first, and the others follow as soon as their leader ends (no barrier).
"""
from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Sequence

from .cell import Cell
from .config import ConfigError, load_config, parse_override
from .errors import UserError
from .preflight import check_paths

log = logging.getLogger(__name__)


def expand(grid: Sequence[str]) -> list[list[str]]:
    """``["a=1,2", "b=x"]`` -> ``[["a=1","b=x"], ["a=2","b=x"]]`` (brackets keep list values whole)."""
    axes: list[list[str]] = []
    for item in grid:
        key, raw = item.split("=", 1) if "=" in item else (item, "")
        parse_override(item)  # same syntax errors as a run
        values = [raw] if raw.strip().startswith("[") else [v for v in raw.split(",")] or [""]
        axes.append([f"{key}={v.strip()}" for v in values])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def plan(files: Sequence[str], grid: Sequence[str], fixed: Sequence[str] = ()) -> list[Cell]:
    """All cells, validated up front (a bad value fails the sweep before any cell runs)."""
    cells = []
    for combo in expand(grid):
        overrides = [*fixed, *combo]
        try:
            cells.append(Cell(overrides, load_config(list(files), overrides)))
        except ConfigError as e:
            raise ConfigError(f"{e} [sweep cell: {' '.join(combo)}]") from None
    return cells


def run_cells(cells: Sequence[Cell], files: Sequence[str] = (), jobs: int = 1,
              desc: str = "sweep", executor: Any = None) -> list[dict[str, Any]]:
    """Run every missing cell (each run id once); return every cell's result (read from disk).

    One leader per alignment group is submitted first (:func:`hftlab.executors.base.priority`); a
    group's other cells are submitted when its leader ends, so they reuse its alignment. A failed cell
    does not stop the others; at the end a RuntimeError names the first failure. ``executor`` (:mod:`hftlab.executors`) says where
    cells run: local worker processes by default, a Ray cluster or Slurm jobs."""
    if jobs < 1:
        raise UserError(f"--jobs: must be >= 1, got {jobs}")
    todo = list({c.run_id: c for c in cells if not c.result_path.is_file()}.values())
    for cfg in {(c.cfg.out_dir, c.cfg.store, c.cfg.model.name): c.cfg for c in todo}.values():
        check_paths(cfg)  # an unwritable out_dir fails now, not in every worker after the organism's build
    log.info("%s: %d cells, %d to run, %d already done", desc, len(cells), len(todo), len(cells) - len(todo))
    if todo:
        from .organism.build import ensure_organism

        if any(c.cfg.model.name == "organism" for c in todo):
            ensure_organism()  # build once before the workers start
        groups: dict[str, list[Cell]] = {}
        for c in todo:
            groups.setdefault(c.align_group(), []).append(c)
        if executor is None:
            from .executors.local import LocalExecutor

            executor = LocalExecutor()
        failures = executor.run(list(groups.values()), files, jobs, desc)
        if failures:
            raise RuntimeError(f"{len(failures)} sweep cell(s) failed; first: {failures[0]}")
    return [{**json.loads(c.result_path.read_text()), "overrides": c.overrides} for c in cells]


def run_sweep(files: Sequence[str], grid: Sequence[str], fixed: Sequence[str] = (), jobs: int = 1,
              desc: str = "sweep", executor: Any = None) -> list[dict[str, Any]]:
    """Run every missing cell of the grid; return every cell's result (finished ones read from disk)."""
    return run_cells(plan(files, grid, fixed), files, jobs, desc, executor)
