"""The local executor: persistent spawned worker processes on this machine (``hftlab sweep --jobs N``)."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, ContextManager, Iterator, Sequence

from ..cell import Cell, run_cell
from .base import WORKER_ENV, Executor, Submit

log = logging.getLogger(__name__)


class LocalExecutor(Executor):
    """``jobs`` persistent worker processes, one torch thread each (:func:`pool`)."""

    name = "local"

    def open(self, jobs: int) -> ContextManager[Submit]:
        return pool(jobs)


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


@contextlib.contextmanager
def pool(jobs: int) -> Iterator[Callable[[Cell, Sequence[str]], Future]]:
    """``submit(cell, files)`` on ``jobs`` spawned workers; a pool broken by a crashed worker is replaced."""
    ctx = multiprocessing.get_context("spawn")
    new = lambda: ProcessPoolExecutor(max(1, jobs), mp_context=ctx, initializer=_worker_init,  # noqa: E731
                                      initargs=(os.getpid(),))
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    pools = [new()]

    def submit(cell: Cell, files: Sequence[str]) -> Future:
        try:
            return pools[-1].submit(run_cell, cell.overrides, list(files))
        except BrokenProcessPool:
            log.warning("a worker process died; starting new workers")
            pools.append(new())
            return pools[-1].submit(run_cell, cell.overrides, list(files))

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
