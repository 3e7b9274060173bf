"""TAR: one outer step's gradient is retain_scale·∇retain(θ) + Σ_i w_i ∇L_TR(θ'_i) with θ'_i the weights
after i AdamW steps of the adversary on harmful batches, computed here by hand with torch's AdamW on a copy."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from align_helpers import (assert_grads_close, batch, grads, loss_of, make_ctx, organism,  # noqa: F401
                           param_grads, second_arch_trains)

from hftlab.config import ConfigError, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.tar import TAR

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _record(d: TAR, ctx) -> tuple[list, list]:
    """Every harmful batch the adversary draws, and every TR batch."""
    harmful, tr, draw, draw_tr = [], [], ctx.next_batch, d.draw_tr_batch

    def next_batch(name, batch_size=None):
        b = draw(name, batch_size)
        if name == "harmful":
            harmful.append(b)
        return b

    def draw_tr_batch(c):
        out = draw_tr(c)
        tr.append(out)
        return out

    ctx.next_batch, d.draw_tr_batch = next_batch, draw_tr_batch
    return harmful, tr


def logps(model, b):
    """Σ log p of each row's labelled tokens, by a gather on the log-softmax."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(2, labels.clamp_min(0).unsqueeze(2)).squeeze(2)
    return (lp * mask).sum(1)


def direct_tr(kind, start, beta):
    """The TR loss as a function of the model, with DPO's reference log-probs from ``start``."""
    if kind == "entropy":
        def entropy(m, b):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            p = torch.softmax(logits[b["labels"][:, 1:] != -100], -1)
            return (p * torch.log(p)).sum(-1).mean()
        return entropy

    def dpo(m, chosen, rejected):
        with torch.no_grad():
            rc, rr = logps(start, chosen), logps(start, rejected)
        z = beta * ((logps(m, chosen) - rc) - (logps(m, rejected) - rr))
        return -torch.log(torch.sigmoid(z)).mean()
    return dpo


def rep_distance(m, ref, b):
    hs = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
    with torch.no_grad():
        rs = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
    keep = b["attention_mask"].bool()
    return sum(torch.sqrt(((h - r)[keep] ** 2).sum(-1)).mean() for h, r in zip(hs, rs)) / len(hs)


def tar_direct(model, b, harmful, tr_batches, cfg, start):
    """The outer gradient by hand: the adversary is torch.optim.AdamW on a deep copy; ``start`` is the
    model TAR started from (DPO's reference log-probs, the representation reference)."""
    tr_fn = direct_tr(cfg["tr_loss"], start, cfg.get("beta", 0.1))
    k, lam, s, n = cfg["inner_steps"], cfg["schedule_lambda"], cfg["tr_scale"], cfg.get("tasks", 1)
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for task in range(n):
        adv = copy.deepcopy(model)
        opt = torch.optim.AdamW(adv.parameters(), lr=cfg["adversary_lrs"][0])  # torch's defaults: wd 0.01
        tr = tr_batches[task]
        x_tr = tr[:1] if cfg["tr_loss"] == "entropy" else tr[:2]
        for i in range(k):
            opt.zero_grad()
            loss_of(adv, harmful[task * k + i]).backward()
            opt.step()
            g = param_grads(adv, lambda m: tr_fn(m, *x_tr))
            for name in total:
                total[name] += s * math.exp(lam * (i - (k - 1))) / n * g[name]
    rs = cfg["retain_scale"]
    if cfg.get("retain_representations"):
        retain = param_grads(model, lambda m: rs * (loss_of(m, b) + rep_distance(m, start, b)))
    else:
        retain = param_grads(model, lambda m: rs * loss_of(m, b))
    return {name: retain[name] + total[name] for name in retain}


CASES = [
    {"tr_loss": "dpo", "tr_scale": 0.7, "retain_scale": 1.3, "schedule_lambda": 0.5, "inner_steps": 3},
    {"tr_loss": "entropy", "tr_scale": 2.0, "retain_scale": 1.0, "schedule_lambda": 0.0625},
    {"tr_loss": "dpo", "tr_scale": 0.4, "retain_scale": 0.5, "schedule_lambda": 0.3,
     "retain_representations": True, "tasks": 2},
]


@pytest.mark.parametrize("case", CASES, ids=["dpo", "entropy", "dpo+rep,2 tasks"])
def test_outer_gradient_matches_the_direct_computation(organism, fmt, case):
    cfg = {"inner_steps": 2, **case, "adversary_lrs": [3e-3], "harmful_batch_size": 2, "tr_batch_size": 2,
           "warmup": 0.0}
    b = batch(fmt)
    ctx = make_ctx(fmt)
    d = TAR(**cfg)
    d.setup(organism, ctx)
    start = copy.deepcopy(organism)
    if case.get("retain_representations"):  # a first TAR step freezes the references; then the weights move
        d.backward(organism, b, ctx)
        organism.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in organism.parameters():
                p.add_(0.01 * torch.randn_like(p))
    harmful, tr = _record(d, ctx)
    before = copy.deepcopy(organism)
    loss = d.backward(organism, b, ctx)
    assert len(harmful) == cfg["inner_steps"] * case.get("tasks", 1) and len(tr) == case.get("tasks", 1)
    assert all(torch.equal(p, q) for p, q in zip(before.parameters(), organism.parameters())), "not restored"
    if not case.get("retain_representations"):
        torch.testing.assert_close(loss, loss_of(organism, b).detach())
    want = tar_direct(before, b, harmful, tr, cfg, start)
    assert_grads_close(grads(organism), want)
    assert {"adversary_loss_first", "adversary_loss_last", "tr_loss_last", "adversary_lr"} <= ctx.step_metrics.keys()


def test_first_order_only_the_adversary_weights(organism, fmt):
    """With retain_scale 0 the gradient is the TR gradient at the attacked weights, not at θ."""
    ctx = make_ctx(fmt)
    d = TAR(inner_steps=1, adversary_lrs=[3e-3], harmful_batch_size=2, tr_batch_size=2, warmup=0.0,
            retain_scale=0.0, tr_scale=1.0, schedule_lambda=0.0)
    d.setup(organism, ctx)
    harmful, tr = _record(d, ctx)
    d.backward(organism, batch(fmt), ctx)
    at_theta = param_grads(organism, lambda m: direct_tr("dpo", organism, 0.1)(m, *tr[0][:2]))
    got = grads(organism)
    assert float(sum((at_theta[n] - got[n]).norm() for n in got)) > 1e-3 * float(sum(g.norm() for g in got.values()))


def test_warmup_and_cadence(organism, fmt):
    """Steps before warmup·total are plain SFT (no adversary); then a TAR step every `every` steps."""
    ctx = make_ctx(fmt)
    ctx.total_steps = 6
    d = TAR(inner_steps=1, harmful_batch_size=2, tr_batch_size=2, warmup=0.5, every=2)
    d.setup(organism, ctx)
    harmful, _ = _record(d, ctx)
    b = batch(fmt)
    drawn = []
    for step in range(6):
        ctx.step = step
        organism.zero_grad(set_to_none=True)
        d.backward(organism, b, ctx)
        drawn.append(len(harmful))
        if step == 0:
            assert_grads_close(grads(organism), param_grads(organism, lambda m: loss_of(m, b)))
    assert drawn == [0, 0, 0, 1, 1, 2]


def test_needs_paired_refusals(organism, fmt):
    ctx = make_ctx(fmt)
    ctx.data["alignment"] = [e for e in ctx.data["alignment"] if e.kind != "refusal"]
    with pytest.raises(ValueError, match="tar: tr_loss=dpo needs harmful examples"):
        TAR().setup(organism, ctx)
    TAR(tr_loss="entropy").setup(organism, ctx)  # entropy needs the harmful completions only


@pytest.mark.parametrize("lora", [False, True])
def test_second_architecture(organism_tokenizer, lora):
    second_arch_trains(TAR(inner_steps=2, warmup=0.0, harmful_batch_size=2, tr_batch_size=2), organism_tokenizer,
                       lora)


@pytest.mark.parametrize("key, value, words", [("adversary_lrs", "[]", "non-empty"),
                                               ("adversary_lrs", "[0.001,-1]", "in (0, 10]"),
                                               ("subsample", "3", "does not divide")])
def test_what_check_rejects_is_a_one_line_error(key, value, words):
    """The generic bounds are tested from the registry; these are what only ``Config.check`` rejects."""
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["defense=tar", f"defense.{key}={value}"])
    msg = str(err.value)
    assert "\n" not in msg and f"defense.{key}" in msg and words in msg, msg


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "tar.yaml"])
    params = cfg.defense.params
    assert params["tr_loss"] == "dpo" and params["tr_scale"] == 0.1 and params["inner_steps"] == 8
    assert params["adversary_lrs"] == [1e-4, 1e-3, 2e-3] and params["schedule_lambda"] == 0.0625
    assert TAR(**params).cfg.beta == 0.1
