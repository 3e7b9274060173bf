"""The local executor: persistent spawned worker processes on this machine (``hftlab sweep --jobs N``)."""
from __future__ import annotations

from typing import ContextManager

from .base import Executor, Submit


class LocalExecutor(Executor):
    """``jobs`` persistent worker processes, one torch thread each (:func:`hftlab.sweep._pool`)."""

    name = "local"

    def open(self, jobs: int) -> ContextManager[Submit]:
        from ..sweep import _pool

        return _pool(jobs)
