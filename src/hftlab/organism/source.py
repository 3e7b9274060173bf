"""The organism's world as a data source: its splits, and what defenses and the evaluation ask of the data.

Besides the splits of :class:`~hftlab.organism.world.World`, a data source answers in its own language
what is specific to it (:class:`~hftlab.data.hub.HubSource` answers the same for real data):

- ``safety_prompt()``: a safety system prompt (PTST's default serving prompt);
- ``trigger_words()``: in-vocabulary words that no refusal uses (BEA draws its secret trigger from them);
- ``refused(response)``: whether a response is a refusal;
- ``same_answer(reference, response)``: whether a benign answer matches the reference answer.
"""
from __future__ import annotations

from . import judge_rules
from .words import REFUSALS, SYSTEM_PROMPTS
from .world import World


class OrganismSource(World):
    """The world of ``seed`` with the organism's prompts and exact rules."""

    def safety_prompt(self) -> str:
        return SYSTEM_PROMPTS["safety"]

    def trigger_words(self) -> tuple[str, ...]:
        """The world's words, sorted, without punctuation and without any word of its refusals."""
        if not hasattr(self, "_trigger_words"):
            refusal = {w for r in REFUSALS for w in r.replace("{e}", "").replace("{topic}", "").split()}
            words = {w for text in self.vocabulary_corpus() for w in text.split()}
            self._trigger_words = tuple(sorted(w for w in words if any(c.isalnum() for c in w) and w not in refusal))
        return self._trigger_words

    def refused(self, response: str) -> bool:
        return judge_rules.is_refusal(response)

    def same_answer(self, reference: str, response: str) -> bool:
        return judge_rules.same_answer(reference, response)
