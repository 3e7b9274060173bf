"""The Ray executor: each cell a Ray task on a cluster (``hftlab sweep --executor ray [--address …]``).

A task asks for ``threads`` CPUs (the cell's ``threads`` key: its torch threads) and ``gpus`` GPUs.
With an address it connects to a running cluster (``auto``, ``ray://host:10001``, ``host:6379``);
without one it starts a local cluster for the sweep and stops it at the end. Workers must see the
same files as the driver (a shared filesystem): they run in the driver's folder, write the run and
stage folders under the same ``out_dir`` and their rows in the same SQLite store.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from .base import Executor, Submit, cell_future, remote_cell, worker_env

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("--executor ray: Ray is not installed (pip install 'hftlab[ray]')") from None
    return ray


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None = None, gpus: float = 0.0, num_cpus: int | None = None):
        self.address, self.gpus, self.num_cpus = address or None, gpus, num_cpus

    @contextlib.contextmanager
    def open(self, jobs: int) -> Iterator[Submit]:
        """Connect (or start a local cluster); ``jobs`` is unused: the cluster's resources bound the
        cells that run at once."""
        ray = _ray()
        started = not ray.is_initialized()
        if started:
            kw: dict[str, Any] = {"address": self.address, "include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if self.address is None and self.num_cpus:
                kw["num_cpus"] = self.num_cpus
            ray.init(**kw)
        log.info("ray: %s", ray.cluster_resources())
        task = ray.remote(remote_cell)
        env, cwd = worker_env(), os.getcwd()

        def submit(cell: Any, files: Any) -> Any:
            ref = task.options(num_cpus=cell.cfg.threads, num_gpus=self.gpus, max_retries=0,
                               name=f"hftlab-{cell.run_id[:12]}").remote(cell.overrides, list(files), cwd, env)
            return cell_future(ref.future(), cell, "ray")

        try:
            yield submit
        finally:
            if started:
                ray.shutdown()
