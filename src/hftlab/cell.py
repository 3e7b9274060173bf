"""One sweep cell: its overrides and resolved config, and how a worker process runs it.

:mod:`hftlab.sweep` plans cells and :mod:`hftlab.executors` runs them (local workers, Ray, Slurm); both
use this module, which imports neither of them.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from . import registry
from .artifacts import content_hash
from .config import Config, load_config
from .errors import UserError

log = logging.getLogger(__name__)


class CellError(RuntimeError):
    """A cell failed: its overrides and the exception's last line."""


def acts_in_align(defense: str) -> bool:
    """Whether the defense changes the alignment stage (its registry entry's stage)."""
    return "align" in registry.stages(defense)


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
        acts = acts_in_align(c.defense.name)
        return content_hash(asdict(c.model), asdict(c.data), asdict(c.align), c.seed,
                            [c.defense.name, c.defense.params] if acts else None)


def run_cell(overrides: list[str], files: list[str]) -> str:
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
