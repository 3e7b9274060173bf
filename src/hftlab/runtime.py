"""The process's runtime: its one Accelerate ``Accelerator`` (device, DDP rank, gradient accumulation).

It sits at the bottom of the package (it imports nothing from hftlab), so model loading, the organism's
build, the pipeline, sweeps and the CLI ask it for the device and the process rank without importing
the training loop.
"""
from __future__ import annotations

from typing import Any

_ACCELERATOR: Any = None


def accelerator(grad_accum: int | None = None) -> Any:
    """The process's single Accelerator; ``grad_accum`` (given by each training stage) configures it."""
    global _ACCELERATOR
    from accelerate import Accelerator

    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(gradient_accumulation_steps=grad_accum or 1)
    if grad_accum is not None:
        _ACCELERATOR.gradient_accumulation_steps = grad_accum
        _ACCELERATOR.step = 0  # its micro-step counter decides when to sync: restart it per stage
    return _ACCELERATOR
