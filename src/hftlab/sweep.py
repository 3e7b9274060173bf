"""``hftlab sweep``: a grid over config keys, cells in parallel processes, resumable.

``hftlab sweep defense=sft,vaccine attack.ratio=0,0.1 seed=0,1,2 --jobs 2`` runs the product of the
comma-separated values. Every cell is validated before anything runs; a cell whose run folder already
holds ``result.json`` is skipped, so a killed sweep reruns only its missing cells. Cells sharing an
alignment run it once: the first cell of each alignment group runs before the others (stage folders
are locked, so a duplicate would only wait). Each cell is a ``hftlab run --json`` subprocess with one
torch thread, and a row in the SQLite store (keyed by run id, so each cell is stored once).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .artifacts import content_hash
from .config import Config, ConfigError, load_config, parse_override, to_dict

log = logging.getLogger(__name__)


@dataclass
class Cell:
    overrides: list[str]
    cfg: Config

    @property
    def run_id(self) -> str:
        return content_hash("run", to_dict(self.cfg))

    @property
    def result_path(self) -> Path:
        return Path(self.cfg.out_dir) / "runs" / self.run_id / "result.json"

    def align_group(self) -> str:
        """Cells with equal groups share their alignment stage (same inputs to ``Pipeline.align``)."""
        from . import registry

        c = self.cfg
        acts = "align" in getattr(registry.get("defense", c.defense.name), "stages", ())
        return content_hash(asdict(c.model), asdict(c.data), asdict(c.align), c.seed,
                            [c.defense.name, c.defense.params] if acts else None)


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


def _run_cell(cell: Cell, files: Sequence[str]) -> dict[str, Any]:
    args = [sys.executable, "-m", "hftlab", "run", *sum((["-c", f] for f in files), []), *cell.overrides, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"cell {' '.join(cell.overrides)} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sweep(files: Sequence[str], grid: Sequence[str], fixed: Sequence[str] = (), jobs: int = 1,
              desc: str = "sweep") -> list[dict[str, Any]]:
    """Run every missing cell; return every cell's result (finished ones read from disk)."""
    cells = plan(files, grid, fixed)
    todo = [c for c in cells if not c.result_path.is_file()]
    log.info("%s: %d cells, %d to run, %d already done", desc, len(cells), len(todo), len(cells) - len(todo))
    if todo:
        from .organism.build import ensure_organism

        if any(c.cfg.model.name == "organism" for c in todo):
            ensure_organism()  # build once before the processes start
        seen: set[str] = set()
        leaders, followers = [], []
        for c in todo:
            (followers if c.align_group() in seen else leaders).append(c)
            seen.add(c.align_group())
        failures: list[str] = []
        with tqdm(total=len(todo), desc=desc, dynamic_ncols=True) as bar:
            for phase in (leaders, followers):
                with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                    futures = {pool.submit(_run_cell, c, files): c for c in phase}
                    for fut in as_completed(futures):
                        try:
                            fut.result()
                        except RuntimeError as e:
                            failures.append(str(e))
                            log.error("%s", e)
                        bar.update(1)
        if failures:
            raise RuntimeError(f"{len(failures)} sweep cell(s) failed; first: {failures[0]}")
    return [{**json.loads(c.result_path.read_text()), "overrides": c.overrides} for c in cells]
