"""``hftlab sweep``: a grid over config keys, cells on a pool of worker processes, resumable.

``hftlab sweep defense=sft,vaccine attack.ratio=0,0.1 seed=0,1,2 --jobs 2`` runs the product of the
comma-separated values. Every cell is validated before anything runs; a cell whose run folder already
holds ``result.json`` is skipped, so a killed sweep reruns only its missing cells. Cells run in-process
in ``jobs`` persistent spawned workers (one torch thread each; torch is imported once per worker, not
once per cell), and each writes a row in the SQLite store (keyed by run id, so each cell is stored once).
Cells sharing an alignment run it once: the first cell of each alignment group (its leader) runs first,
the longest alignments first, and the others follow as soon as their leader ends (no barrier).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .artifacts import content_hash
from .config import Config, ConfigError, load_config, parse_override, to_dict
from .errors import UserError
from .preflight import check_paths

log = logging.getLogger(__name__)

# Leaders run in this order: alignment-stage defenses first (the long ones, longest first), then the rest.
ALIGN_FIRST = ("booster", "repnoise", "vaccine", "t-vaccine")
# The workers' environment (they start on demand, so ours holds it while the pool lives).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


class CellError(RuntimeError):
    """A cell failed: its overrides and the exception's last line."""


def _acts_in_align(defense: str) -> bool:
    from . import registry

    return "align" in getattr(registry.get("defense", defense), "stages", ())


@dataclass
class Cell:
    overrides: list[str]
    cfg: Config

    @property
    def run_id(self) -> str:
        from .pipeline import run_key

        return run_key(self.cfg)

    @property
    def result_path(self) -> Path:
        return Path(self.cfg.out_dir) / "runs" / self.run_id / "result.json"

    def align_group(self) -> str:
        """Cells with equal groups share their alignment stage (same inputs to ``Pipeline.align``)."""
        c = self.cfg
        acts = _acts_in_align(c.defense.name)
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


def _priority(cell: Cell) -> tuple[int, int]:
    """Sort key of a group's leader: alignment-stage defenses first, in ``ALIGN_FIRST`` order."""
    name = cell.cfg.defense.name
    if not _acts_in_align(name):
        return (1, 0)
    return (0, ALIGN_FIRST.index(name) if name in ALIGN_FIRST else len(ALIGN_FIRST))


def _worker_init(parent: int) -> None:
    """Set up a pool worker: one torch thread, warnings only, no inner bars, dies with the sweep."""
    if sys.platform.startswith("linux"):  # a parent killed alone must not leave idle workers behind
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.simplefilter("ignore", FutureWarning)  # libraries' deprecation notes, once per worker
    from tqdm import std

    init = std.tqdm.__init__

    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:  # TQDM_DISABLE loses to an explicit disable=
        init(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = quiet  # type: ignore[method-assign]
    import torch

    torch.set_num_threads(1)


def _work(overrides: list[str], files: list[str]) -> str:
    """Run one cell in this worker (it writes result.json and its store row); return its run id."""
    from .pipeline import run
    from .runtime import accelerator

    try:
        return run(load_config(files, overrides))["run_id"]
    except Exception as e:
        if not isinstance(e, UserError):  # a bug: the traceback helps (a user's error is its message)
            log.error("cell %s:", " ".join(overrides), exc_info=True)
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__
        raise CellError(f"cell {' '.join(overrides)} failed: {why}") from None
    finally:
        accelerator().free_memory()  # the accelerator would keep every prepared model alive


@contextlib.contextmanager
def _pool(jobs: int) -> Iterator[Callable[[Cell, Sequence[str]], Future]]:
    """``submit(cell, files)`` on ``jobs`` spawned workers; a pool broken by a crashed worker is replaced."""
    ctx = multiprocessing.get_context("spawn")
    new = lambda: ProcessPoolExecutor(max(1, jobs), mp_context=ctx, initializer=_worker_init,  # noqa: E731
                                      initargs=(os.getpid(),))
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    pools = [new()]

    def submit(cell: Cell, files: Sequence[str]) -> Future:
        try:
            return pools[-1].submit(_work, cell.overrides, list(files))
        except BrokenProcessPool:
            log.warning("a worker process died; starting new workers")
            pools.append(new())
            return pools[-1].submit(_work, cell.overrides, list(files))

    try:
        yield submit
    finally:
        for p in pools:
            p.shutdown(wait=True, cancel_futures=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failure(fut: Future, cell: Cell) -> str | None:
    """The cell's error line, or None if it succeeded."""
    try:
        fut.result()
    except CellError as e:
        return str(e)
    except Exception as e:  # a crashed worker (BrokenProcessPool), an unpicklable result
        return f"cell {' '.join(cell.overrides)} failed: {type(e).__name__}: {e}"
    return None


def run_cells(cells: Sequence[Cell], files: Sequence[str] = (), jobs: int = 1,
              desc: str = "sweep", executor: Any = None) -> list[dict[str, Any]]:
    """Run every missing cell (each run id once); return every cell's result (read from disk).

    One leader per alignment group is submitted first (see ``ALIGN_FIRST``); a group's other cells are
    submitted when its leader ends, so they reuse its alignment. A failed cell does not stop the others;
    at the end a RuntimeError names the first failure. ``executor`` (:mod:`hftlab.executors`) says where
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
