"""``sft``: no defense. Plain supervised fine-tuning in every stage (the baseline of every paper)."""
from __future__ import annotations

from .base import Defense


class SFT(Defense):
    """The baseline: every hook is the plain default."""

    name = "sft"
