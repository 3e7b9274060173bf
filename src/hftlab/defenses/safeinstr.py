"""SafeInstr: mix safety (refusal) demonstrations into the user's fine-tuning data.

Paper: Bianchi et al., "Safety-Tuned LLaMAs: Lessons From Improving the Safety of Large Language Models
that Follow Instructions", arXiv 2309.07875 ("adding just 3% safety examples … can substantially
improve safety"). The same data-level mechanism is VLGuard's mixed fine-tuning (Zong et al., "Safety
Fine-Tuning at (Almost) No Cost: A Baseline for Vision Large Language Models", arXiv 2402.02207), which
also mixes helpful answers to benign prompts into its safety set (``kinds: [refusal, chat]``).
Reference: vinid/safety-tuned-llamas, ``data/training/README.md`` (``saferpaca_Instructions_X.json`` =
the 20k Alpaca samples + X ∈ {100, 300, 500, 1000, 1500, 2000} safety samples, i.e. added on top) and
``training/finetuning.py`` (the mixed file is trained on as one shuffled dataset).

``n_safety`` samples (or ``round(ratio · n)`` when ``n_safety`` is 0) are drawn without replacement from
the provider's alignment set (``ctx.data["alignment"]``, examples whose ``kind`` is in ``kinds``) with
``random.Random(seed)``, and appended to the user's n samples, which are left untouched; the loop
shuffles. Never drawn from the attack or evaluation sets.

Deviations:
- The safety samples are the alignment set's refusals (harmful prompt → refusal), not the paper's 2,000
  GPT-3.5 answers to Anthropic red-teaming prompts; on the organism that set is the world's refusals.
- The ratio is of the user's n (the fine-tuning-stage protocol of the harmful fine-tuning survey), not
  of a 20k instruction-tuning set; the mixed set has n + k samples, so an epoch has more steps.
- The draw uses ``seed`` (like ``attack.seed``), not the run seed: every run seed sees the same mix.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..bounds import bounds
from ..data.example import Example
from .base import Context, Defense

log = logging.getLogger(__name__)

KINDS = ("refusal", "chat", "task")


@dataclass
class Config:
    ratio: float = field(default=0.03, metadata=bounds(0.0, 1.0))  # k = max(1, round(ratio·n)) (paper: 3%)
    n_safety: int = field(default=0, metadata=bounds(0))  # if > 0: exactly this many (paper: 100 … 2000)
    kinds: list[str] = field(default_factory=lambda: ["refusal"])  # alignment-set kinds to draw from
    seed: int = field(default=0, metadata=bounds(0))  # draws the safety subset

    def check(self) -> None:
        if self.n_safety == 0 and self.ratio == 0:
            raise ValueError("ratio: 0 with n_safety 0 mixes no safety samples (set one of them > 0)")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds: {bad or '[]'} is not a non-empty subset of {', '.join(KINDS)}")

    def count(self, n_user: int) -> int:
        """Number of safety samples to mix into ``n_user`` user samples."""
        return self.n_safety if self.n_safety > 0 else max(1, round(self.ratio * n_user))


def draw_safety(alignment: Sequence[Example], k: int, seed: int,
                kinds: Sequence[str] = ("refusal",), who: str = "safeinstr") -> list[Example]:
    """``k`` distinct alignment-set examples of the given kinds, drawn with ``random.Random(seed)``."""
    pool = [ex for ex in alignment if ex.kind in kinds]
    if k > len(pool):
        raise ValueError(f"{who}: needs {k} safety samples but the alignment set has only {len(pool)} of "
                         f"kind {'/'.join(kinds)} (raise data.alignment_n)")
    return random.Random(seed).sample(pool, k)


class SafeInstr(Defense):
    """Appends k safety demonstrations of the provider to the user's fine-tuning data."""

    name = "safeinstr"
    needs = ("alignment",)
    Config = Config

    def prepare_data(self, stage: str, data: list[Example], ctx: Context) -> list[Example]:
        if stage != "finetune":
            return data
        k = self.cfg.count(len(data))
        safety = draw_safety(ctx.data.get("alignment", []), k, self.cfg.seed, self.cfg.kinds)
        log.info("safeinstr: %d safety samples mixed into %d user samples", k, len(data))
        return list(data) + safety
