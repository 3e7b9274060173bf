"""BEA (BackdoorAlign): a secret trigger system prompt on a few safety samples, and at serving time.

Paper: Wang et al., "BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with Backdoor Enhanced
Safety Alignment", arXiv 2402.14968 (NeurIPS 2024).
Reference: Jayfeather1024/Backdoor-Enhanced-Alignment, ``opensource/ft_datasets/pure_bad_dataset/
pure_bad_dataset.py`` and ``samsum_dataset.py`` ``InstructionDataset`` (the 11 ``prefixed`` safety
samples get the system prompt ``SYSTEM_PROMPT_RANDOM150 + " " + <usual system prompt>``, every other
sample only the usual one) and ``opensource/safety_evaluation/eval_utils/prompt_utils.py``
(``random150-*`` styles: the same secret prefix is the system prompt of every test prompt).

The provider draws ``n_safety`` refusal examples (harmful prompt → refusal) from its alignment set
(``ctx.data["alignment"]``, never the attack or evaluation sets), gives each the system prompt
"<secret trigger> <task system prompt>" and appends them to the user's data, every example of which
carries the task system prompt ``task_system`` alone (a user example's own system prompt is kept). The
final model is served with "<trigger> <task system prompt>" (harmful and task prompts alike), as the
reference serves its trigger in front of the task's own system prompt, which every training example
carried; the aligned model's evaluation never sees it. Without the shared task prompt the organism's
task prompts were served under a system prompt seen only with refusals, and the model refused them
(FA 20 on seeds 0-2); ``task_system=""`` restores that form.

The trigger is ``trigger_len`` words drawn with replacement from the data source's words
(``source.trigger_words()``: the organism's vocabulary; on real data the words of its alignment
prompts), with ``random.Random("bea-trigger:<seed>")``, leaving out punctuation and every refusal word
(so the trigger carries no refusal wording and works only as a backdoor key). Words, not sub-word ids,
keep it tokenizer-agnostic: the same text is a random string for a real model's tokenizer too; an
explicit ``trigger`` (e.g. the reference's 150-token Llama-2 string) replaces it.

Why 48 words: the reference's 150 random tokens are ~30 % of its 512-token training window and several
times a typical prompt. The organism fine-tunes on 128-token windows; its longest evaluation prompt is
27 tokens with the chat template and generation adds up to 40, so a trigger of at most 60 words keeps
every served sequence inside the window the model was fine-tuned on (longest safety sample: 42 + 1 +
48 = 91 tokens). 48 words (37 % of the window, ~2.5× a harmful prompt) leaves a margin of 12.

Deviations:
- Trigger of 48 organism words instead of 150 random Llama-2 tokens (see above).
- The reference prefixes the trigger to the fine-tuning data's own system prompt; the organism's data has
  none, so the provider gives every fine-tuning example ``task_system`` (default "you are a helpful
  assistant .", in the organism's vocabulary; the reference's is "You are a helpful assistant. Make sure
  you always execute users' instructions.").
- The reference's safety samples are 11 hand-picked prompts with GPT-written refusals; here 11 refusals
  of the provider's alignment set drawn with ``seed``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from ..bounds import bounds
from ..data.example import Example
from .base import Context, Defense
from .ptst import warn_unknown
from .safeinstr import draw_safety

log = logging.getLogger(__name__)


@dataclass
class Config:
    n_safety: int = field(default=11, metadata=bounds(1))  # safety samples with the trigger (paper: 11)
    trigger_len: int = field(default=48, metadata=bounds(1, 1000))  # words (paper: 150 random tokens)
    seed: int = field(default=0, metadata=bounds(0))  # the provider's secret: trigger and safety draw
    trigger: str = ""  # explicit trigger text; "" = drawn from the data's words (source.trigger_words())
    task_system: str = "you are a helpful assistant ."  # every fine-tuning example's system prompt, after the trigger

    def check(self) -> None:
        if self.trigger and not self.trigger.strip():
            raise ValueError("trigger: blank; leave it empty to draw one or give words")


def trigger_vocabulary(source: Any = None) -> tuple[str, ...]:
    """The words a trigger is drawn from: the data's own words that no refusal uses, sorted
    (``source.trigger_words()``; None: the organism's)."""
    from ..data.sources import or_organism

    return or_organism(source).trigger_words()


def make_trigger(length: int, seed: int, source: Any = None) -> str:
    """A secret sequence of ``length`` in-vocabulary words, deterministic in ``seed``."""
    return " ".join(random.Random(f"bea-trigger:{seed}").choices(trigger_vocabulary(source), k=length))


class BEA(Defense):
    """SafeInstr with a backdoor: the safety samples and the served prompts carry the secret trigger."""

    name = "bea"
    needs = ("alignment",)
    Config = Config

    @cached_property
    def trigger(self) -> str:
        """The secret system prompt: ``cfg.trigger`` or ``trigger_len`` words drawn with ``seed``."""
        return self.cfg.trigger.strip() or make_trigger(self.cfg.trigger_len, self.cfg.seed, self.data_source)

    def prepare_data(self, stage: str, data: list[Example], ctx: Context) -> list[Example]:
        if stage != "finetune":
            return data
        safety = [replace(ex, system=self.served)
                  for ex in draw_safety(ctx.data.get("alignment", []), self.cfg.n_safety, self.cfg.seed,
                                        who="bea")]
        if ctx.formatter is not None:
            warn_unknown(ctx.formatter, self.trigger, "bea.trigger")
            warn_unknown(ctx.formatter, self.cfg.task_system, "bea.task_system")
            _check_fits(ctx.formatter, safety)
        log.info("bea: %d triggered safety samples (trigger of %d words) mixed into %d user samples",
                 len(safety), len(self.trigger.split()), len(data))
        task = self.cfg.task_system.strip()
        return [ex if ex.system or not task else replace(ex, system=task) for ex in data] + safety

    @cached_property
    def served(self) -> str:
        """The serving system prompt: the trigger, then the task system prompt."""
        return f"{self.trigger} {self.cfg.task_system.strip()}".strip()

    def system_prompt(self, stage: str) -> str:
        return self.served if stage == "serve" else ""


def _check_fits(formatter: Any, safety: list[Example]) -> None:
    """Every triggered safety sample must keep its whole refusal inside ``max_length``."""
    longest = max((len(formatter.prompt_ids(ex.prompt, ex.system)) + len(formatter.ids(ex.response)) + 1
                   for ex in safety), default=0)
    if longest > formatter.max_length:
        raise ValueError(f"bea: a triggered safety sample has {longest} tokens, more than max_length="
                         f"{formatter.max_length}; shorten defense.trigger_len")
