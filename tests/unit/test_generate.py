"""Batched generation: grouped batches never mix groups, and batching does not change any answer."""
from __future__ import annotations

import pytest

from hftlab.config import ModelConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.eval.generate import HFGenerator
from hftlab.models.loading import load_model


@pytest.fixture(scope="module")
def prompts_and_groups(organism_path):
    src = get_source("organism")
    harmful = [e.prompt for e in src.harmful("eval", 12)]
    task = [e.prompt for e in src.task("sentiment", "test", 12)]
    chat = [e.prompt for e in src.benign_eval(24) if e.kind == "chat"][:8]
    prompts = [p for trio in zip(harmful, task, chat) for p in trio] + harmful[8:] + task[8:]
    groups = ["harmful" if p in harmful else "task" if p in task else "chat" for p in prompts]
    return prompts, groups


@pytest.fixture(scope="module")
def generator_factory(organism_path, organism_tokenizer):
    model = load_model(organism_path, ModelConfig())
    fmt = Formatter(organism_tokenizer, "auto", max_length=160)
    return lambda batch: HFGenerator(model, fmt, max_new_tokens=24, batch_size=batch)


def test_batches_hold_one_group_each_sorted_by_length(prompts_and_groups, generator_factory):
    prompts, groups = prompts_and_groups
    gen = generator_factory(5)
    batches = gen._batches(prompts, [""] * len(prompts), groups)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    assert all(len(b) <= 5 for b in batches)
    for b in batches:
        assert len({groups[i] for i in b}) == 1
        lengths = [len(gen.fmt.prompt_ids(prompts[i])) for i in b]
        assert lengths == sorted(lengths)
    # ungrouped: one length-sorted sequence over every prompt
    flat = [i for b in gen._batches(prompts, [""] * len(prompts), None) for i in b]
    assert [len(gen.fmt.prompt_ids(prompts[i])) for i in flat] == sorted(len(gen.fmt.prompt_ids(p)) for p in prompts)


def test_grouping_and_batching_change_no_answer(prompts_and_groups, generator_factory):
    prompts, groups = prompts_and_groups
    grouped = generator_factory(8).generate(prompts, groups=groups)
    mixed = generator_factory(8).generate(prompts)
    single = generator_factory(1).generate(prompts)
    assert grouped == mixed == single
    assert any(len(a.split()) > 8 for a in grouped) and any(len(a.split()) <= 2 for a in grouped)
