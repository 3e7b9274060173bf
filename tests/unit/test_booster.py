"""Booster: the update is ∇f(w) + λ(∇h(w) − ∇h(w − α∇h/‖∇h‖)), with a fresh harmful batch each step."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import (accumulation_matches, assert_grads_close, batch, grads, logged_steps, loss_of, make_ctx,  # noqa: F401,E501
                           mixed_batch, organism, param_grads, second_arch_trains, vaccine_direct)

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.booster import Booster
from hftlab.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _recording(ctx):
    """Record every harmful batch the defense draws."""
    seen, draw = [], ctx.next_batch

    def next_batch(name, batch_size=None):
        b = draw(name, batch_size)
        if name == "harmful":
            seen.append(b)
        return b

    ctx.next_batch = next_batch
    return seen


def booster_direct(model, b, hb, lam, alpha, f_grads=None):
    """The formula on copies of the model: ∇f + λ(∇h(w) − ∇h(w − α∇h/‖∇h‖))."""
    gf = f_grads if f_grads is not None else param_grads(model, lambda m: loss_of(m, b))
    gh = param_grads(model, lambda m: loss_of(m, hb))
    norm = torch.sqrt(sum((g ** 2).sum() for g in gh.values()))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in gh:
                p -= alpha * gh[n] / norm
    gh2 = param_grads(moved, lambda m: loss_of(m, hb))
    return {n: gf[n] + lam * (gh[n] - gh2[n]) for n in gf}


@pytest.mark.parametrize("lam, alpha", [(5.0, 0.1), (1.0, 0.5)])
def test_update_matches_the_formula(organism, fmt, lam, alpha):
    b = batch(fmt)
    ctx = make_ctx(fmt)
    seen = _recording(ctx)
    before = {n: p.detach().clone() for n, p in organism.named_parameters()}
    d = Booster(lam=lam, alpha=alpha)
    d.setup(organism, ctx)
    loss = d.backward(organism, b, ctx)
    assert len(seen) == 1
    assert all(torch.equal(before[n], p) for n, p in organism.named_parameters()), "weights not restored"
    torch.testing.assert_close(loss, loss_of(organism, b).detach())
    want = booster_direct(organism, b, seen[0], lam, alpha)
    assert_grads_close(grads(organism), want)


def test_fresh_harmful_batch_each_step(organism, fmt):
    ctx = make_ctx(fmt)
    seen = _recording(ctx)
    d = Booster()
    d.setup(organism, ctx)
    for _ in range(3):
        d.backward(organism, batch(fmt), ctx)
        organism.zero_grad(set_to_none=True)
    assert len(seen) == 3 and all(len(b["input_ids"]) == 10 for b in seen)  # the reference's batch of 10
    assert not torch.equal(seen[0]["input_ids"][:, :8], seen[1]["input_ids"][:, :8])
    assert not torch.equal(seen[1]["input_ids"][:, :8], seen[2]["input_ids"][:, :8])


@pytest.mark.parametrize("mixed", [False, True])
def test_perturb_aware_is_booster_plus_vaccine(organism, fmt, mixed):
    b = mixed_batch(fmt) if mixed else batch(fmt)
    ctx = make_ctx(fmt)
    seen = _recording(ctx)
    d = Booster(perturb_aware=True, rho=5.0)
    d.setup(organism, ctx)
    d.backward(organism, b, ctx)
    _, gf = vaccine_direct(organism, b, 5.0)
    want = booster_direct(organism, b, seen[0], 5.0, 0.1, f_grads=gf)
    assert_grads_close(grads(organism), want)


def test_harmful_batch_size_zero_takes_the_alignment_batch_size(organism, fmt):
    ctx = make_ctx(fmt)
    seen = _recording(ctx)
    d = Booster(harmful_batch_size=0)
    d.setup(organism, ctx)
    d.backward(organism, batch(fmt), ctx)
    assert len(seen[0]["input_ids"]) == ctx.batch_size != 10


def test_gradient_accumulation(organism, fmt):
    accumulation_matches(lambda: Booster(), organism, fmt)


def test_diagnostics_logged_per_step(organism, fmt, tmp_path):
    """losses.jsonl carries h(w), h after the simulated harmful step and ‖∇h‖ at every step; the step
    descends h (α small), and the logged h is the harmful batch's loss at the weights of that step."""
    ctx = make_ctx(fmt)
    seen = _recording(ctx)
    start = copy.deepcopy(organism)
    rows = logged_steps(Booster(alpha=0.01), organism, fmt, tmp_path, ctx=ctx)
    for r in rows:
        assert r["harmful_grad_norm"] > 0 and r["harmful_loss_after_step"] < r["harmful_loss"]
    assert rows[0]["harmful_loss"] == pytest.approx(float(loss_of(start, seen[0]).detach()), rel=1e-4)


def test_missing_harmful_set_fails_before_training(organism, fmt):
    ctx = make_ctx(fmt, harmful=False)
    before = {n: p.detach().clone() for n, p in organism.named_parameters()}
    with pytest.raises(ValueError, match="booster: needs the provider's 'harmful' set"):
        train(organism, fmt.encode_all(ctx.data["alignment"]), TrainConfig(max_steps=2, batch_size=4),
              defense=Booster(), ctx=ctx)
    assert all(torch.equal(before[n], p) for n, p in organism.named_parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_second_architecture(organism_tokenizer, lora):
    second_arch_trains(Booster(perturb_aware=lora), organism_tokenizer, lora)


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "booster.yaml"])
    assert cfg.defense.params == {"lam": 5.0, "alpha": 0.1, "perturb_aware": False, "rho": 5.0,
                                 "harmful_batch_size": 10}
