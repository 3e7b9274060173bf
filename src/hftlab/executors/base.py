"""What every executor shares: the dependency-ordered scheduler and the remote cell entry point.

An executor turns a cell into a :class:`concurrent.futures.Future` whose result is the cell's run id
(or whose exception is a :class:`~hftlab.cell.CellError`). :meth:`Executor.run` schedules the cells
the same way on every backend: one leader per alignment group first (alignment-stage defenses first), each
group's other cells as soon as its leader ends, so every alignment is computed once.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Callable, ContextManager, Sequence

from tqdm.auto import tqdm

from .. import registry
from ..cell import Cell, CellError, run_cell

log = logging.getLogger(__name__)

Submit = Callable[[Cell, Sequence[str]], Future]
# The workers' environment (they start on demand, so ours holds it while the pool lives).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
# Variables a remote worker needs from the driver: where the organism and the hub cache live, offline
# mode, the device choice, and the trackers' settings.
FORWARD_PREFIXES = ("HFTLAB_", "HF_", "ACCELERATE_", "WANDB_", "MLFLOW_", "CUDA_VISIBLE", "TOKENIZERS_")


class Executor:
    """Runs sweep cells somewhere; subclasses provide :meth:`open`."""

    name = "base"

    def open(self, jobs: int) -> ContextManager[Submit]:
        raise NotImplementedError

    def run(self, groups: Sequence[Sequence[Cell]], files: Sequence[str], jobs: int,
            desc: str) -> list[str]:
        """Run every group (leader first, then its followers); return the failures' messages."""
        failures: list[str] = []
        with self.open(jobs) as submit, tqdm(total=sum(map(len, groups)), desc=desc, dynamic_ncols=True) as bar:
            leaders_first = sorted(groups, key=lambda g: priority(g[0]))
            running = {submit(g[0], files): (g[0], list(g[1:])) for g in leaders_first}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    cell, followers = running.pop(fut)
                    error = failure(fut, cell)
                    if error:
                        failures.append(error)
                        log.error("%s", error)
                    bar.update(1)
                    running.update({submit(c, files): (c, []) for c in followers})
        return failures


def priority(cell: Cell) -> int:
    """Sort key of a group's leader: 0 for an alignment-stage defense (its own alignment is the long
    part of its cells, so it starts first), 1 for the others; the sort keeps the grid's order among equals."""
    return 0 if "align" in registry.stages(cell.cfg.defense.name) else 1


def failure(fut: Future, cell: Cell) -> str | None:
    """The cell's error line, or None if it succeeded."""
    try:
        fut.result()
    except CellError as e:
        return str(e)
    except Exception as e:  # a crashed worker (BrokenProcessPool), an unpicklable result
        return f"cell {' '.join(cell.overrides)} failed: {type(e).__name__}: {e}"
    return None


def worker_env() -> dict[str, str]:
    """The environment a remote cell runs with: the local workers' settings and the driver's
    hftlab / Hugging Face / tracker variables."""
    fwd = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}
    return {**fwd, **WORKER_ENV}


def _quiet() -> None:
    """Warnings only and no inner progress bars in a remote worker (it may run many cells)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.simplefilter("ignore", FutureWarning)
    from tqdm import std

    if getattr(std.tqdm.__init__, "_hftlab_quiet", False):
        return
    init = std.tqdm.__init__

    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "disable": True})

    quiet._hftlab_quiet = True  # type: ignore[attr-defined]
    std.tqdm.__init__ = quiet  # type: ignore[method-assign]


def remote_cell(overrides: list[str], files: list[str], cwd: str, env: dict[str, str]) -> tuple[str | None, str | None]:
    """Run one cell on a remote worker, in the driver's folder and environment (relative ``out_dir``
    and config paths mean the same there: a run id covers ``out_dir``). Returns ``(run_id, None)`` or
    ``(None, error line)``: a cell's failure crosses process and pickling boundaries as plain text."""
    os.environ.update(env)
    os.chdir(cwd)
    _quiet()
    try:
        return run_cell(overrides, files), None
    except CellError as e:
        return None, str(e)


def remote_group(cells: list[list[str]], files: list[str], cwd: str,
                 env: dict[str, str]) -> list[tuple[str | None, str | None]]:
    """Run an alignment group's cells one after the other (the first computes the alignment)."""
    return [remote_cell(o, files, cwd, env) for o in cells]


def cell_future(outcome: Future, cell: Cell, label: str) -> Future:
    """A future that resolves like a local cell's from one that resolves to :func:`remote_cell`'s pair."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            run_id, error = f.result()
        except BaseException as e:  # the backend lost the cell: a killed job, a dead node
            lines = str(e).strip().splitlines()
            why = f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__
            out.set_exception(CellError(f"cell {' '.join(cell.overrides)} failed on {label}: {why}"))
            return
        if error:
            out.set_exception(CellError(error))
        else:
            out.set_result(run_id)

    outcome.add_done_callback(done)
    return out

