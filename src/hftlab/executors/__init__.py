"""Where sweep cells run: ``local`` (worker processes here), ``ray`` (a Ray cluster), ``slurm`` (submitit).

Every executor schedules the same way (:meth:`base.Executor.run`: each alignment once, its followers
after it) and every cell writes its run folder and store row itself, so the store stays the single
source of truth whatever ran the cells. Ray and submitit are optional extras, imported only when used.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Executor

NAMES = ("local", "ray", "slurm")


def add_args(p: argparse.ArgumentParser) -> None:
    """The ``--executor`` flags of ``hftlab sweep`` and ``hftlab bench``."""
    g = p.add_argument_group("executor (where cells run)")
    g.add_argument("--executor", choices=NAMES, default="local",
                   help="local worker processes (default), a Ray cluster, or Slurm jobs through submitit")
    g.add_argument("--address", default=None,
                   help="ray: the cluster to connect to (auto, ray://HOST:10001); default: start a local one")
    g.add_argument("--gpus", type=float, default=0, help="ray/slurm: GPUs per cell (per job for slurm)")
    g.add_argument("--partition", default=None, help="slurm: partition")
    g.add_argument("--time", type=int, default=60, metavar="MIN", help="slurm: time limit per job in minutes")
    g.add_argument("--mem-gb", type=float, default=None, help="slurm: memory per job")
    g.add_argument("--slurm-per", choices=("cell", "group"), default="cell",
                   help="slurm: one job per cell, or one per alignment group (its cells in order)")
    g.add_argument("--slurm-folder", default=None, help="slurm: submitit logs (default: <out_dir>/slurm)")
    g.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: any other sbatch option, e.g. account=lab, qos=high (repeatable)")


def from_args(args: argparse.Namespace) -> "Executor":
    """The executor the flags ask for."""
    extra = {}
    for opt in getattr(args, "slurm_opt", []):
        key, sep, value = opt.partition("=")
        if not sep or not key:
            from ..errors import ConfigError

            raise ConfigError(f"--slurm-opt '{opt}': expected KEY=VALUE")
        extra[key.strip()] = value.strip()
    return make(args.executor, address=args.address, gpus=args.gpus, partition=args.partition,
                time_min=args.time, mem_gb=args.mem_gb, per=args.slurm_per, folder=args.slurm_folder, extra=extra)


def make(name: str = "local", **opts: object) -> "Executor":
    """An executor by name; options that do not apply to it are ignored."""
    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from .ray_cluster import RayExecutor

        return RayExecutor(address=opts.get("address"), gpus=float(opts.get("gpus") or 0))  # type: ignore[arg-type]
    if name == "slurm":
        from .slurm import SlurmExecutor

        keys = ("partition", "time_min", "mem_gb", "per", "folder", "extra", "cluster", "poll_s")
        kw = {k: opts[k] for k in keys if opts.get(k) is not None}
        return SlurmExecutor(gpus=int(opts.get("gpus") or 0), **kw)  # type: ignore[arg-type]
    from ..errors import ConfigError

    raise ConfigError(f"--executor: {name!r} is not one of {', '.join(NAMES)}")
