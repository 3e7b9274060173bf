"""PTST: the token ids of training carry no system prompt (or the configured training one) and the ids
served to the final model carry the safety prompt; the aligned model is evaluated without it."""
from __future__ import annotations

from dataclasses import replace

import pytest
from data_defense_helpers import as_served, contains, make_ctx, recording, user_data  # noqa: F401

from hftlab.config import load_config
from hftlab.data.format import Formatter
from hftlab.defenses.ptst import PTST, unknown_words
from hftlab.organism.world import SYSTEM_PROMPTS
from hftlab.pipeline import run

SAFETY = SYSTEM_PROMPTS["safety"]


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def system_id(fmt: Formatter) -> int:
    return fmt.tok.convert_tokens_to_ids("<|system|>")


def test_default_prompts_are_in_the_organism_vocabulary(fmt):
    cfg = PTST().cfg  # the serving prompt defaults to the data source's safety prompt
    assert cfg.train_system == "" and cfg.serve_system == "" and PTST().system_prompt("serve") == SAFETY
    assert unknown_words(fmt, PTST().system_prompt("serve")) == []
    assert unknown_words(fmt, "You are a Helpful assistant") == ["You", "Helpful"]


def test_training_ids_have_no_system_prompt_and_serving_ids_have_the_safety_prompt(fmt):
    defense = PTST()
    data = user_data()
    data[0] = replace(data[0], system=SYSTEM_PROMPTS["aoa"])  # a user-supplied prompt is replaced too
    trained = [fmt.encode(ex)["input_ids"] for ex in as_served(defense, "finetune", data, make_ctx(fmt))]
    plain = [fmt.encode(replace(ex, system=""))["input_ids"] for ex in data]
    assert trained == plain
    assert not any(system_id(fmt) in ids for ids in trained)

    served = fmt.generation_batch([ex.prompt for ex in data[:4]], [defense.system_prompt("serve")] * 4)
    safety_ids = fmt.ids(SAFETY)
    for row, ex in zip(served["input_ids"].tolist(), data[:4]):
        assert system_id(fmt) in row and contains(row, safety_ids)
        assert contains(row, fmt.ids(ex.prompt))


def test_configured_training_template(fmt):
    train = "you are a helpful assistant ."
    defense = PTST(train_system=train)
    served = as_served(defense, "finetune", user_data(), make_ctx(fmt))
    trained = [fmt.encode(ex)["input_ids"] for ex in served]
    assert all(contains(ids, [system_id(fmt), *fmt.ids(train)]) for ids in trained)
    assert not any(contains(ids, fmt.ids(SAFETY)) for ids in trained)
    assert defense.system_prompt("serve") == SAFETY and defense.system_prompt("align") == ""


def test_pipeline_trains_plain_and_serves_with_the_safety_prompt(fast_overrides, recording, fmt):
    result = run(load_config(overrides=[*fast_overrides, "defense=ptst"]))
    assert 0.0 <= result["harmful_score"] <= 100.0
    sys_id, safety_ids = system_id(fmt), fmt.ids(SAFETY)
    trained = recording.train_features("finetune")
    assert len(trained) == 64 and not any(sys_id in f["input_ids"] for f in trained)
    aligned_rows = recording.generation_rows(before="finetune")
    final_rows = recording.generation_rows(after="finetune")
    assert aligned_rows and not any(sys_id in r for r in aligned_rows)
    assert final_rows and all(contains(r, [sys_id, *safety_ids]) for r in final_rows)
