"""PTST, "Pure Tuning, Safe Testing": fine-tune without a safety system prompt, serve with one.

Paper: Lyu et al., "Keeping LLMs Aligned After Fine-tuning: The Crucial Role of Prompt Templates",
arXiv 2402.18540.
Reference: vfleaking/PTST, ``prompt_utils.py`` ``get_prompt_template``: fine-tuning uses a template
without the safety prompt (``chat:vanilla`` = no system prompt, or ``chat:alpaca``), testing uses
``chat:llama`` (the Llama-2 default system prompt, ``LLAMA_BASE_PROMPT``).

Every fine-tuning example gets the training system prompt ``train_system`` ("" = none; a user-supplied
system prompt is replaced, since the provider chooses the template), and every evaluated prompt of the
final model (harmful and task) gets ``serve_system``. Weights and the loss are untouched.

Deviations:
- The serving prompt defaults to the data source's safety prompt (``source.safety_prompt()``): on real
  data Llama-2's, the paper's; on the organism its own, in its vocabulary.
- The chat template is the model's own; the paper's "Question: …" wrapper of GSM8K is not added.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..data.example import Example
from .base import Context, Defense

log = logging.getLogger(__name__)


@dataclass
class Config:
    train_system: str = ""  # training template's system prompt (paper: chat:vanilla, none)
    serve_system: str = ""  # safety prompt at test time; "" = the data's own (paper: chat:llama)

    def check(self) -> None:
        if self.serve_system and not self.serve_system.strip():
            raise ValueError("serve_system: blank; give a non-empty safety system prompt, or \"\" for the data's")
        if self.serve_system == self.train_system and self.serve_system:
            raise ValueError("serve_system: equals train_system; PTST needs a different prompt at test time")


def unknown_words(formatter: Any, text: str) -> list[str]:
    """Words of ``text`` that the formatter's tokenizer maps to its unknown token (organism: word-level)."""
    tok = getattr(formatter, "tok", None)
    unk = getattr(tok, "unk_token_id", None)
    if not text or unk is None:
        return []
    return [w for w in text.split() if unk in formatter.ids(w)]


def warn_unknown(formatter: Any, text: str, key: str) -> None:
    """Log a warning when a system prompt is partly out of the tokenizer's vocabulary."""
    bad = unknown_words(formatter, text)
    if bad:
        log.warning("%s: %d words are unknown to the tokenizer (%s…); they become <unk>",
                    key, len(bad), " ".join(bad[:5]))


class PTST(Defense):
    """Training with ``train_system`` (default none), serving with the safety prompt ``serve_system``."""

    name = "ptst"
    Config = Config

    def prepare_data(self, stage: str, data: list[Example], ctx: Context) -> list[Example]:
        if stage != "finetune":
            return data
        warn_unknown(ctx.formatter, self.cfg.train_system, "ptst.train_system")
        warn_unknown(ctx.formatter, self.served, "ptst.serve_system")
        return [replace(ex, system=self.cfg.train_system) for ex in data]

    @property
    def served(self) -> str:
        """The serving prompt: ``serve_system``, or the data source's safety prompt."""
        if self.cfg.serve_system:
            return self.cfg.serve_system
        from ..data.sources import or_organism

        prompt = or_organism(self.data_source).safety_prompt()
        if prompt == self.cfg.train_system:
            raise ValueError("ptst: train_system equals the data's safety prompt; PTST needs a different prompt "
                             "at test time (set defense.serve_system)")
        return prompt

    def system_prompt(self, stage: str) -> str:
        if stage == "serve":
            return self.served
        return self.cfg.train_system if stage == "finetune" else ""

