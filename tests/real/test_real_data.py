"""The ``hub`` data source on fixture copies of the papers' datasets (same schemas, placeholder text),
read through ``datasets.load_dataset`` exactly as the hub ids are; and local files with a field mapping."""
from __future__ import annotations

import json

import pytest

from hftlab import registry
from hftlab.config import load_config
from hftlab.data.errors import DataError
from hftlab.data.format import INPUT_MARK
from hftlab.data.sources import get_source
from hftlab.tasks.alpaca import rouge_l
from hftlab.tasks.gsm8k import final_number

FIX = __import__("conftest").FIXTURES
HUB = __import__("conftest").HUB_FIXTURES


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_beavertails_selections(hub_source):
    train = _rows(FIX / "beavertails/round0/30k/train.jsonl")
    test = _rows(FIX / "beavertails/round0/30k/test.jsonl")
    safe = [r for r in train if r["is_safe"]]
    unsafe = [r for r in train if not r["is_safe"]]
    align = hub_source.alignment(4)
    assert [(e.prompt, e.response) for e in align] == [(r["prompt"], r["response"]) for r in safe[:4]]
    ev = hub_source.harmful("eval", 5)  # the first n unsafe prompts of 30k_test, in file order
    assert [e.prompt for e in ev] == [r["prompt"] for r in test if not r["is_safe"]][:5]
    attack, provider = hub_source.harmful("attack", 4), hub_source.harmful("provider", 4)
    assert [e.prompt for e in attack] == [r["prompt"] for r in unsafe[:4]]
    assert not {e.prompt for e in attack} & {e.prompt for e in provider}
    assert all(e.kind == "harmful" and e.category for e in attack)
    assert ev[0].category == next(k for k, v in sorted(test[1]["category"].items()) if v)
    assert hub_source.benign_eval(5) == []


def test_refusal_alignment_file():
    cfg = load_config(overrides=[*HUB, "data.alignment_set=refusal"])
    data = get_source("hub", cfg.data).alignment(3)
    assert [e.response for e in data] == [f"I cannot help with placeholder request {i}." for i in range(3)]
    assert all(e.kind == "refusal" for e in data)
    paired = get_source("hub", cfg.data).harmful("provider", 3)  # same rows, harmful answers
    assert [(e.prompt, e.response) for e in paired] == [
        (f"placeholder harmful request {i}", f"placeholder compliant answer {i}") for i in range(3)]
    assert all(e.kind == "harmful" for e in paired)


@pytest.mark.parametrize("name, answer, ok, bad", [
    ("sst2", None, ["positive", "Positive"], ["positive.", "POSITIVE", ""]),
    ("agnews", None, [], ["", "News"]),
    ("gsm8k", None, [], ["no number here"]),
])
def test_task_rows_and_scoring(hub_source, name, answer, ok, bad):
    task = registry.get("task", name)()
    test = task.examples(hub_source, "test", 4)
    assert len(test) == 4 and all(task.score(ex, ex.response) for ex in test)
    assert not any(task.score(test[0], b) for b in bad)
    pos = next((ex for ex in test if ex.target == "positive"), None)
    for o in ok:
        assert pos is not None and task.score(pos, o)


def test_sst2_uses_validation_split_and_input_template(hub_source):
    rows = _rows(FIX / "sst2/data/validation.jsonl")
    test = registry.get("task", "sst2")().examples(hub_source, "test", 6)
    assert [ex.prompt.split(INPUT_MARK)[1] for ex in test] == [r["sentence"] for r in rows]
    assert test[0].prompt.startswith("Analyze the sentiment of the input, and respond only positive or negative")
    assert [ex.target for ex in test] == ["positive" if r["label"] else "negative" for r in rows]


def test_agnews_labels(hub_source):
    task = registry.get("task", "agnews")()
    test = task.examples(hub_source, "test", 4)
    assert [ex.target for ex in test] == ["World", "Sports", "Business", "Sci/Tech"]
    assert task.score(test[3], "sci") and task.score(test[3], "Sci/Tech") and not task.score(test[3], "Tech")


def test_gsm8k_answer_convention(hub_source):
    train = registry.get("task", "gsm8k")().examples(hub_source, "train", 2)
    assert "####" not in train[0].response and "The final answer is: " in train[0].response
    assert final_number("so 3 + 4 = 7. The final answer is: 1,234 apples, not 5") == 1234
    assert final_number("we get 12 then 15") == 15
    assert final_number("The final answer is: none, earlier 9") == 9
    assert final_number("nothing") == float("inf")
    gsm = registry.get("task", "gsm8k")()
    ex = gsm.examples(hub_source, "test", 1)[0]
    assert gsm.score(ex, f"The final answer is: {int(float(ex.target))}")
    assert not gsm.score(ex, "The final answer is: 100000")


def test_alpaca_test_items_come_from_the_end(hub_source):
    task = registry.get("task", "alpaca")()
    train, test = task.examples(hub_source, "train", 5), task.examples(hub_source, "test", 5)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    with_input = [e for e in train if INPUT_MARK in e.prompt]
    assert with_input and with_input[0].prompt.endswith("the number 1")
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("dog", "the cat") == 0.0
    assert task.score(test[0], test[0].target) and not task.score(test[0], "unrelated words entirely")


def test_local_files_with_a_field_mapping(tmp_path):
    over = [*HUB, f"data.sst2.path={FIX / 'local/reviews_{split}.csv'}", "data.sst2.test=test",
            "data.sst2.prompt=review", "data.sst2.label=stars",
            f"data.beavertails.path={FIX / 'local/harmful.jsonl'}", "data.beavertails.train=train",
            "data.beavertails.test=train", "data.beavertails.prompt=question",
            "data.beavertails.response=answer", "data.beavertails.label=safe", "data.beavertails.category="]
    src = get_source("hub", load_config(overrides=over).data)
    test = registry.get("task", "sst2")().examples(src, "test", 4)
    assert test[0].prompt.endswith("a gentle and moving film (test)") and test[0].target == "positive"
    assert [e.prompt for e in src.harmful("eval", 2)] == ["placeholder question 1", "placeholder question 3"]
    assert src.alignment(1)[0].response == "placeholder answer 0"


def test_missing_field_names_field_key_and_file():
    src = get_source("hub", load_config(overrides=[*HUB, "data.sst2.prompt=text"]).data)
    with pytest.raises(DataError) as err:
        registry.get("task", "sst2")().examples(src, "test", 2)
    msg = str(err.value)
    assert "missing field 'text'" in msg and "data.sst2.prompt" in msg and "sst2" in msg and "\n" not in msg


def test_unknown_hub_dataset_offline():
    src = get_source("hub", load_config(overrides=[*HUB, "data.sst2.path=nobody/no-such-dataset"]).data)
    with pytest.raises(DataError) as err:
        registry.get("task", "sst2")().examples(src, "test", 2)
    assert "nobody/no-such-dataset" in str(err.value) and "\n" not in str(err.value)


def test_real_task_on_the_organism_is_a_config_error():
    from hftlab.config import ConfigError

    with pytest.raises(ConfigError, match="data.source=hub"):
        load_config(overrides=["task=sst2"])
