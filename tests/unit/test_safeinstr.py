"""SafeInstr: exactly the configured number / fraction of the provider's refusals is appended, drawn
deterministically from the alignment set only; the user's samples are untouched."""
from __future__ import annotations

import pytest
from data_defense_helpers import SOURCE, make_ctx, user_data

from hftlab.config import load_config
from hftlab.defenses.safeinstr import SafeInstr
from hftlab.pipeline import run


def test_mixes_exactly_n_safety_refusals_from_the_alignment_set():
    ctx = make_ctx(None)
    data = user_data()
    out = SafeInstr(n_safety=7).prepare_data("finetune", data, ctx)
    assert len(out) == len(data) + 7
    assert out[: len(data)] == data  # user data untouched, same order
    added = out[len(data):]
    assert all(ex.kind == "refusal" for ex in added)
    assert all(ex in ctx.data["alignment"] for ex in added)
    assert len(set(added)) == 7  # without replacement
    attack_eval = {ex.prompt for ex in SOURCE.harmful("attack", 500) + SOURCE.harmful("eval", 500)}
    assert not attack_eval & {ex.prompt for ex in added}


@pytest.mark.parametrize("ratio, n_user, k", [(0.03, 1000, 30), (0.1, 32, 3), (0.5, 32, 16), (0.001, 32, 1)])
def test_ratio_of_the_user_data(ratio, n_user, k):
    data = (user_data() * 40)[:n_user]
    out = SafeInstr(ratio=ratio).prepare_data("finetune", data, make_ctx(None, alignment_n=4000))
    assert len(out) - n_user == k
    assert out[:n_user] == data


def test_n_safety_overrides_ratio_and_default_is_three_percent():
    assert SafeInstr(ratio=0.5, n_safety=4).cfg.count(1000) == 4
    assert SafeInstr().cfg.count(1000) == 30


def test_draw_is_deterministic_in_its_seed_and_not_in_the_run_seed():
    data = user_data()
    a = SafeInstr(n_safety=10, seed=3).prepare_data("finetune", data, make_ctx(None))
    ctx = make_ctx(None)
    ctx.seed = 99
    b = SafeInstr(n_safety=10, seed=3).prepare_data("finetune", data, ctx)
    c = SafeInstr(n_safety=10, seed=4).prepare_data("finetune", data, make_ctx(None))
    assert a == b and a != c


def test_vlguard_style_kinds_and_other_stages():
    ctx = make_ctx(None)
    data = user_data()
    out = SafeInstr(n_safety=40, kinds=["refusal", "chat"]).prepare_data("finetune", data, ctx)
    assert {ex.kind for ex in out[len(data):]} == {"refusal", "chat"}
    assert SafeInstr().prepare_data("align", data, ctx) is data


def test_too_many_safety_samples_is_an_error():
    with pytest.raises(ValueError, match="safeinstr: needs 10000 safety samples"):
        SafeInstr(n_safety=10000).prepare_data("finetune", user_data(), make_ctx(None, alignment_n=100))


def test_pipeline_trains_on_the_mixed_data(fast_overrides):
    result = run(load_config(overrides=[*fast_overrides, "defense=safeinstr", "defense.n_safety=5"]))
    finetune = next(s for s in result["stages"] if s["name"] == "finetune")
    assert finetune["metrics"]["examples"] == 64 + 5  # attack.n in FAST + the safety samples
    assert 0.0 <= result["harmful_score"] <= 100.0
