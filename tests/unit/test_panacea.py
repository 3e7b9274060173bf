"""Panacea (post-fine-tuning): the min-max gradient, ‖ε‖ = ρ, the objective decreasing, w + ε served."""
from __future__ import annotations

import copy

import pytest
import torch
from repair_helpers import SOURCE, tiny_gpt2, tiny_llama

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.base import Context, lm_loss
from hftlab.defenses.panacea import Panacea
from hftlab.models.loading import add_lora
from hftlab.pipeline import run


def setup(tok, lora: bool, make=tiny_llama):
    fmt = Formatter(tok, max_length=64)
    model = make(len(tok), tok.pad_token_id)
    if lora:
        torch.manual_seed(0)
        model = add_lora(model, TrainConfig(lora=True, lora_r=4))
        with torch.no_grad():  # non-zero B so that every LoRA factor gets a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    user = fmt.collate(fmt.encode_all(SOURCE.task("sentiment", "train", 4) + SOURCE.harmful("attack", 2)))
    return fmt, model.train(), user


def ctx_of(fmt) -> Context:
    return Context(stage="finetune", formatter=fmt, data={"harmful": SOURCE.harmful("provider", 40)}, seed=0)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def direct_gradient(model, user, harmful, rho: float, lam: float, clamp: float) -> list[torch.Tensor]:
    """Written out: ∇g(w) − λ·(∇min(h(w + ε), clamp) − ∇h(w)), ε = ρ·∇h(w)/‖∇h(w)‖."""
    ps = trainable(model)
    g = torch.autograd.grad(lm_loss(model, user), ps)
    h0 = torch.autograd.grad(lm_loss(model, harmful), ps)
    norm = torch.sqrt(sum((x ** 2).sum() for x in h0))
    with torch.no_grad():
        for p, x in zip(ps, h0):
            p.add_(rho * x / norm)
    h1 = torch.autograd.grad(torch.clamp(lm_loss(model, harmful), max=clamp), ps)
    with torch.no_grad():
        for p, x in zip(ps, h0):
            p.sub_(rho * x / norm)
    return [a - lam * (b - c) for a, b, c in zip(g, h1, h0)]


@pytest.mark.parametrize("lora, clamp", [(True, 5.0), (False, 5.0), (True, 0.0)])
def test_gradient_is_the_min_max_gradient(lora, clamp, organism_tokenizer):
    fmt, model, user = setup(organism_tokenizer, lora)
    defense = Panacea(rho=0.5, lam=1.0, clamp=clamp)
    harmful = ctx_of(fmt).next_batch("harmful", 10)  # the batch the defense will draw
    want = direct_gradient(copy.deepcopy(model), user, harmful, 0.5, 1.0, clamp)
    before = [p.detach().clone() for p in trainable(model)]
    ctx = ctx_of(fmt)
    defense.backward(model, user, ctx)
    for p, w, b in zip(trainable(model), want, before):
        assert torch.allclose(p.grad, w, atol=1e-5, rtol=1e-4)
        assert torch.equal(p.detach(), b)  # w is restored exactly after the perturbed pass
    eps = ctx.state["panacea_eps"]
    assert torch.sqrt(sum((e ** 2).sum() for e in eps)).item() == pytest.approx(0.5, rel=1e-4)  # ‖ε‖ = ρ


def objective(model, user, harmful, defense) -> float:
    """g(w) − λ·(min(h(w + ε), c) − h(w)) at the current weights."""
    ps = trainable(model)
    m = copy.deepcopy(model)
    eps, _ = defense.perturbation(m, trainable(m), harmful)
    with torch.no_grad():
        g, h0 = float(lm_loss(model, user)), float(lm_loss(model, harmful))
        for p, e in zip(ps, eps):
            p.add_(e)
        h1 = min(float(lm_loss(model, harmful)), defense.cfg.clamp)
        for p, e in zip(ps, eps):
            p.sub_(e)
    return g - defense.cfg.lam * (h1 - h0)


def test_objective_decreases_under_its_gradient(organism_tokenizer):
    fmt, model, user = setup(organism_tokenizer, lora=True)
    defense = Panacea(rho=0.5, lam=1.0)
    harmful = ctx_of(fmt).next_batch("harmful", 10)
    start = objective(model, user, harmful, defense)
    for _ in range(5):
        ctx = ctx_of(fmt)  # same harmful batch every step
        defense.backward(model, user, ctx)
        with torch.no_grad():
            for p in trainable(model):
                p.sub_(0.05 * p.grad)
                p.grad = None
    assert objective(model, user, harmful, defense) < start


@pytest.mark.parametrize("lora, make", [(True, tiny_llama), (False, tiny_llama), (True, tiny_gpt2)])
def test_teardown_serves_w_plus_eps(lora, make, organism_tokenizer):
    fmt, model, user = setup(organism_tokenizer, lora, make)
    defense, ctx = Panacea(), ctx_of(fmt)
    defense.backward(model, user, ctx)
    eps = ctx.state["panacea_eps"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    defense.teardown(model, ctx)
    moved = iter(eps)
    for n, p in model.named_parameters():
        want = before[n] + next(moved) if p.requires_grad else before[n]
        assert torch.equal(p.detach(), want), n
    assert "panacea_eps" not in ctx.state


def test_pipeline_runs_panacea_in_the_finetune_stage(fast_overrides):
    result = run(load_config(overrides=[*fast_overrides, "defense=panacea"]))
    assert [s["name"] for s in result["stages"]] == ["align", "evaluate_aligned", "finetune", "evaluate"]
    assert 0.0 <= result["harmful_score"] <= 100.0
