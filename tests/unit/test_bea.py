"""BEA: the secret trigger is deterministic in its seed, made of in-vocabulary words, and appears only in
the mixed-in safety samples and in the prompts served to the final model (never in the user's samples,
never when the aligned model is evaluated)."""
from __future__ import annotations

from dataclasses import replace

import pytest
from data_defense_helpers import as_served, contains, make_ctx, recording, user_data  # noqa: F401

from hftlab.config import load_config
from hftlab.data.format import Formatter
from hftlab.defenses.bea import BEA, trigger_vocabulary
from hftlab.defenses.ptst import unknown_words
from hftlab.organism.world import REFUSAL_MARKERS
from hftlab.pipeline import run


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=128)


def test_trigger_is_deterministic_in_vocabulary_words(fmt):
    a, b, c = BEA().trigger, BEA().trigger, BEA(seed=1).trigger
    assert a == b and a != c
    assert len(a.split()) == 48 and len(BEA(trigger_len=5).trigger.split()) == 5
    assert unknown_words(fmt, a) == []
    assert fmt.tok.unk_token_id not in fmt.ids(a)
    refusal_words = {w for m in REFUSAL_MARKERS for w in m.split()}
    assert not refusal_words & set(a.split()) and not refusal_words & set(trigger_vocabulary())
    assert BEA(trigger="owl grey owl").trigger == "owl grey owl"


def test_trigger_only_in_the_safety_samples(fmt):
    defense = BEA()
    data = user_data()
    ctx = make_ctx(fmt)
    out = as_served(defense, "finetune", data, ctx)
    assert len(out) == len(data) + 11
    task = "you are a helpful assistant ."
    # user samples: untouched but for the task system prompt every fine-tuning example carries
    assert [replace(ex, system="") for ex in out[: len(data)]] == data
    assert all(ex.system == task for ex in out[: len(data)])
    safety = out[len(data):]
    assert defense.served == f"{defense.trigger} {task}"
    assert all(ex.kind == "refusal" and ex.system == defense.served for ex in safety)
    assert all(ex.prompt in {a.prompt for a in ctx.data["alignment"]} for ex in safety)
    trigger_ids = fmt.ids(defense.trigger)
    ids = [fmt.encode(ex)["input_ids"] for ex in out]
    assert [contains(i, trigger_ids) for i in ids] == [False] * len(data) + [True] * 11
    labels = [fmt.encode(ex)["labels"] for ex in safety]
    assert all(lab[-1] == fmt.tok.eos_token_id for lab in labels)  # the whole refusal fits
    assert as_served(defense, "finetune", data, make_ctx(fmt)) == out  # deterministic
    assert defense.system_prompt("serve") == defense.served  # trigger + task prompt, as the reference serves
    assert defense.system_prompt("finetune") == "" and defense.system_prompt("align") == ""
    bare = BEA(task_system="")  # the trigger alone, on untouched user data
    out = as_served(bare, "finetune", data, make_ctx(fmt))
    assert out[: len(data)] == data and bare.system_prompt("serve") == bare.trigger


def test_trigger_too_long_for_max_length_is_an_error(fmt):
    with pytest.raises(ValueError, match="shorten defense.trigger_len"):
        BEA(trigger_len=120).prepare_data("finetune", user_data(), make_ctx(fmt))


def test_pipeline_trigger_in_safety_samples_and_final_serving_only(fast_overrides, recording, fmt):
    result = run(load_config(overrides=[*fast_overrides, "defense=bea"]))
    assert 0.0 <= result["harmful_score"] <= 100.0
    trigger_ids = fmt.ids(BEA().trigger)
    trained = recording.train_features("finetune")
    has = [contains(f["input_ids"], trigger_ids) for f in trained]
    assert len(trained) == 64 + 11 and has == [False] * 64 + [True] * 11
    assert not any(contains(f["input_ids"], trigger_ids) for f in recording.train_features("align"))
    aligned_rows = recording.generation_rows(before="finetune")
    final_rows = recording.generation_rows(after="finetune")
    assert aligned_rows and not any(contains(r, trigger_ids) for r in aligned_rows)
    assert final_rows and all(contains(r, trigger_ids) for r in final_rows)
