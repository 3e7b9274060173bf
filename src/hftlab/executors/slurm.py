"""The Slurm executor through submitit (``hftlab sweep --executor slurm --partition gpu --time 60``).

One job per cell (followers are submitted when their alignment's leader ends), or with
``--slurm-per group`` one job per alignment group that runs its cells in order. Resumable like a local
sweep: a cell whose ``result.json`` exists (written after its store row) is not resubmitted. Jobs run
in the driver's folder with its ``hftlab``/Hugging Face variables, on a filesystem the driver shares;
submitit keeps each job's logs and pickles under ``--slurm-folder`` (default ``<out_dir>/slurm``).
``cluster="local"`` runs the same jobs as local processes (submitit's LocalExecutor), for testing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from tqdm.auto import tqdm

from .base import Executor, Submit, cell_future, remote_cell, remote_group, worker_env

if TYPE_CHECKING:
    from ..cell import Cell

log = logging.getLogger(__name__)


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("--executor slurm: submitit is not installed (pip install 'hftlab[slurm]')") from None
    return submitit


class _Poller:
    """Resolves a future per submitit job from one thread that polls the jobs' states."""

    def __init__(self, every: float):
        self.every, self.jobs, self.stop = every, [], threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="hftlab-slurm-poll")
        self.thread.start()

    def add(self, job: Any) -> Future:
        fut: Future = Future()
        with self.lock:
            self.jobs.append((job, fut))
        return fut

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                pending = list(self.jobs)
            for job, fut in pending:
                if not job.done():
                    continue
                try:
                    fut.set_result(job.result())
                except BaseException as e:  # noqa: BLE001 (a failed or cancelled job: the cell's error)
                    fut.set_exception(e)
                with self.lock:
                    self.jobs.remove((job, fut))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class SlurmExecutor(Executor):
    name = "slurm"

    def __init__(self, partition: str | None = None, time_min: int = 60, gpus: int = 0,
                 mem_gb: float | None = None, per: str = "cell", folder: str | None = None,
                 cluster: str | None = "slurm", extra: dict[str, Any] | None = None, poll_s: float | None = None):
        if per not in ("cell", "group"):
            from ..errors import ConfigError

            raise ConfigError(f"--slurm-per: {per!r} is not one of cell, group")
        self.partition, self.time_min, self.gpus, self.mem_gb = partition, time_min, gpus, mem_gb
        self.per, self.folder, self.cluster, self.extra = per, folder, cluster, dict(extra or {})
        self.poll_s = poll_s if poll_s is not None else (0.5 if cluster == "local" else 10.0)
        self._root = Path(folder or "runs/slurm")

    def _executor(self, folder: Path, threads: int) -> Any:
        ex = _submitit().AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.time_min, "gpus_per_node": self.gpus,
                                  "cpus_per_task": threads, "name": "hftlab", "tasks_per_node": 1}
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        params.update({k if k.startswith(("slurm_", "local_")) else f"slurm_{k}": v for k, v in self.extra.items()})
        ex.update_parameters(**params)
        return ex

    def _folder(self, cells: Sequence["Cell"]) -> Path:
        return Path(self.folder) if self.folder else Path(cells[0].cfg.out_dir) / "slurm"

    def run(self, groups: Sequence[Sequence["Cell"]], files: Sequence[str], jobs: int, desc: str) -> list[str]:
        folder = self._folder(groups[0])
        if self.per == "cell":
            self._root = folder
            return super().run(groups, files, jobs, desc)
        return self._run_groups(groups, files, folder, desc)

    @contextlib.contextmanager
    def open(self, jobs: int) -> Iterator[Submit]:
        """``jobs`` is unused: Slurm's queue bounds the cells that run at once."""
        poller, env, cwd, executors = _Poller(self.poll_s), worker_env(), os.getcwd(), {}

        def submit(cell: "Cell", files: Sequence[str]) -> Future:
            threads = cell.cfg.threads
            if threads not in executors:
                executors[threads] = self._executor(self._root, threads)
            job = executors[threads].submit(remote_cell, cell.overrides, list(files), cwd, env)
            log.info("slurm: job %s for cell %s", job.job_id, " ".join(cell.overrides))
            return cell_future(poller.add(job), cell, f"slurm job {job.job_id}")

        try:
            yield submit
        finally:
            poller.close()

    def _run_groups(self, groups: Sequence[Sequence["Cell"]], files: Sequence[str], folder: Path,
                    desc: str) -> list[str]:
        """One job per alignment group, its cells in order; a cell's failure does not stop its group."""
        from concurrent.futures import wait

        poller, env, cwd = _Poller(self.poll_s), worker_env(), os.getcwd()
        failures: list[str] = []
        try:
            running = {}
            for g in groups:
                ex = self._executor(folder, max(c.cfg.threads for c in g))
                job = ex.submit(remote_group, [c.overrides for c in g], list(files), cwd, env)
                running[poller.add(job)] = (g, job.job_id)
            with tqdm(total=sum(map(len, groups)), desc=desc, dynamic_ncols=True) as bar:
                for fut in wait(running).done:
                    g, job_id = running[fut]
                    try:
                        outcomes = fut.result()
                    except BaseException as e:  # noqa: BLE001
                        line = (str(e).strip().splitlines() or [""])[-1]
                        outcomes = [(None, None if c.result_path.is_file() else  # done before the job died
                                     f"cell {' '.join(c.overrides)} failed on slurm job {job_id}: "
                                     f"{type(e).__name__}: {line}") for c in g]
                    failures += [err for _, err in outcomes if err]
                    bar.update(len(g))
        finally:
            poller.close()
        for f in failures:
            log.error("%s", f)
        return failures
