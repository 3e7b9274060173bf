"""Organism-specific text and rules reach PTST, BEA and the evaluation through the run's data source:
importing them imports nothing of the organism, and a real-data source's own answers are used."""
from __future__ import annotations

import subprocess
import sys

from hftlab.data.hub import LLAMA2_SYSTEM_PROMPT, HubSource
from hftlab.defenses.bea import BEA
from hftlab.defenses.ptst import PTST
from hftlab.eval.evaluate import judge_generations
from hftlab.tasks.organism_tasks import Sentiment


class WordsSource:
    """A data source in another language: its own safety prompt, words, refusals and answer rule."""

    def safety_prompt(self) -> str:
        return "be kind and safe"

    def trigger_words(self) -> tuple[str, ...]:
        return ("alpha", "beta", "gamma")

    def refused(self, response: str) -> bool:
        return response.startswith("nope")

    def same_answer(self, reference: str, response: str) -> bool:
        return reference.upper() == response.upper()


def test_importing_ptst_bea_and_the_evaluation_imports_no_organism():
    code = ("import sys, hftlab.defenses.bea, hftlab.defenses.ptst, hftlab.eval.evaluate, hftlab.data.sources; "
            "print(sorted(m for m in sys.modules if m.startswith('hftlab.organism')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_defaults_come_from_the_bound_source():
    ptst, bea = PTST(), BEA(trigger_len=20)
    for d in (ptst, bea):
        d.bind_data(WordsSource())
    assert ptst.system_prompt("serve") == "be kind and safe" and ptst.system_prompt("finetune") == ""
    assert set(bea.trigger.split()) <= {"alpha", "beta", "gamma"} and len(bea.trigger.split()) == 20
    assert PTST(serve_system="my prompt").system_prompt("serve") == "my prompt"  # an explicit prompt wins


def test_refusals_and_benign_answers_are_judged_in_the_sources_language():
    rows = [{"set": "benign", "prompt": "q", "response": "nope, not that", "category": "", "target": "",
             "kind": "chat", "reference": "x"},
            {"set": "benign", "prompt": "q", "response": "yes", "category": "", "target": "", "kind": "chat",
             "reference": "YES"}]
    scores, metrics = judge_generations(rows, "keyword", Sentiment(), source=WordsSource())
    assert [s["refused"] for s in scores] == [True, False] and [s["correct"] for s in scores] == [False, True]
    assert metrics["benign_accuracy"] == 50.0


def test_the_hub_source_answers_in_english():
    hub = HubSource(cfg=None)
    assert hub.safety_prompt() == LLAMA2_SYSTEM_PROMPT
    assert hub.refused("Sorry , I will not do that") and not hub.refused("Here is a recipe")
    assert hub.same_answer("The Answer", "the answer") and not hub.same_answer("a", "b")
