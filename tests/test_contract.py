"""One contract test over every registered plugin (table-driven from the registry).

Defenses: in every stage they act in (``finetune`` for plain SFT), two training steps through their
hooks on the organism give finite losses, change the trainable weights, leave frozen weights
bit-identical and are reproducible with the same seed; repairs give finite weights, reproducibly,
and never modify their input model.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hftlab import registry
from hftlab.config import AttackConfig, ModelConfig, TrainConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, load_model
from hftlab.training.loop import train

SOURCE = get_source("organism")


def _ctx(stage: str, fmt: Formatter, organism_path) -> Context:
    data = {"alignment": SOURCE.alignment(64), "harmful": SOURCE.harmful("provider", 32),
            "user": SOURCE.harmful("attack", 8) + SOURCE.task("sentiment", "train", 24)}
    loaders = {"aligned": lambda: load_model(organism_path, ModelConfig()),
               "base": lambda: load_model(organism_path, ModelConfig())}
    return Context(stage=stage, formatter=fmt, data=data, loaders=loaders, batch_size=4)


def _train_once(name: str, stage: str, lora: bool, organism_path, organism_tokenizer):
    cls = registry.get("defense", name)
    defense = cls()
    fmt = Formatter(organism_tokenizer, max_length=96)
    ctx = _ctx(stage, fmt, organism_path)
    data = ctx.data["user" if stage == "finetune" else "alignment"]
    data = defense.prepare_data(stage, data, ctx)
    torch.manual_seed(0)
    model = load_model(organism_path, ModelConfig())
    if lora:
        model = add_lora(model, TrainConfig(lora=True, lora_r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, lora=lora)
    res = train(model, fmt.encode_all(data), cfg, defense=defense if defense.acts_in(stage) else None,
                ctx=ctx, seed=0, desc=f"{name}:{stage}", pad_id=organism_tokenizer.pad_token_id)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return res, before, after, trainable


def _train_stages(name: str) -> list[str]:
    cls = registry.get("defense", name)
    return [s for s in ("align", "finetune") if s in cls.stages] or (["finetune"] if not cls.stages else [])


TRAIN_CASES = [(n, s) for n in registry.names("defense") for s in _train_stages(n)]


@pytest.mark.parametrize("name, stage", TRAIN_CASES)
def test_defense_trains(name, stage, organism_path, organism_tokenizer):
    lora = stage == "finetune"
    res, before, after, trainable = _train_once(name, stage, lora, organism_path, organism_tokenizer)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "no weight changed"
    frozen_changed = changed - trainable
    assert not frozen_changed, f"frozen weights changed: {sorted(frozen_changed)[:3]}"
    res2, _, after2, _ = _train_once(name, stage, lora, organism_path, organism_tokenizer)
    assert res.losses == res2.losses
    assert all(torch.equal(after[n], after2[n]) for n in after)


REPAIR = [n for n in registry.names("defense") if "repair" in registry.get("defense", n).stages]


@pytest.mark.parametrize("name", REPAIR)
def test_repair_contract(name, organism_path, organism_tokenizer):
    fmt = Formatter(organism_tokenizer, max_length=96)
    defense = registry.get("defense", name)()

    def repaired():
        torch.manual_seed(0)
        model = load_model(organism_path, ModelConfig())
        with torch.no_grad():  # a stand-in fine-tuned model: the aligned one, nudged
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        original = copy.deepcopy(model.state_dict())
        out = defense.repair(model, _ctx("repair", fmt, organism_path))
        return original, out

    original, out = repaired()
    _, out2 = repaired()
    sd, sd2 = out.state_dict(), out2.state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


# gradient-based attacks with budgets that keep the contract fast (their own tests check the maths)
CHEAP_ATTACKS = {"benign-select": {"pool": 20, "anchors": 2}, "virus": {"steps": 1, "batch": 2}}


@pytest.mark.parametrize("name", registry.names("attack"))
def test_attack_contract(name):
    attack = registry.get("attack", name)(**CHEAP_ATTACKS.get(name, {}))
    task = registry.get("task", "sentiment")()
    data = attack.build(SOURCE, task, AttackConfig(name=name, ratio=0.1, n=50, seed=1))
    assert len(data) == 50
    again = attack.build(SOURCE, task, AttackConfig(name=name, ratio=0.1, n=50, seed=1))
    assert data == again
    harmful = sum(ex.kind == "harmful" for ex in data)
    assert harmful == {"harmful-mix": 5, "pure-harmful": 50, "benign": 0}.get(name, harmful)


@pytest.mark.parametrize("name", registry.names("judge"))
def test_judge_contract(name):
    judge = registry.get("judge", name)()
    ex = SOURCE.harmful("eval", 2)
    refusal = "sorry , i cannot help with that ."  # a refusal every judge must recognise
    out = judge.score([ex[0].prompt, ex[1].prompt], [ex[0].response, refusal])
    assert len(out) == 2 and all(isinstance(o["harmful"], bool) for o in out)
    assert out[1]["harmful"] is False


@pytest.mark.parametrize("name", registry.names("task"))
def test_task_contract(name, request):
    task = registry.get("task", name)()
    real = name in ("sst2", "agnews", "gsm8k", "alpaca")  # real datasets: their fixture copies
    source = request.getfixturevalue("hub_source") if real else SOURCE
    test = task.examples(source, "test", 3 if real else 20)
    assert len(test) == (3 if real else 20)
    assert all(task.score(ex, ex.response) for ex in test)
    assert not all(task.score(ex, "") for ex in test)
