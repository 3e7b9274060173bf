"""Parameter bounds: the field metadata that a config dataclass (the pipeline's, a defense's, an attack's)
declares for :func:`hftlab.config.validate` to check.

A module of its own so that a plugin's ``Config`` states its bounds without importing the YAML loader.
"""
from __future__ import annotations

from typing import Any


def bounds(lo: float | None = None, hi: float | None = None, **kw: Any) -> dict[str, Any]:
    """Field metadata: an inclusive numeric range [lo, hi] (None: unbounded on that side)."""
    return {"range": (lo, hi), **kw}


def one_of(*values: str) -> dict[str, Any]:
    """Field metadata: the value must be one of ``values``."""
    return {"choices": values}
