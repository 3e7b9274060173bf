"""T-Vaccine: layers are sampled in proportion to harmful-gradient norms at their attention outputs,
and only the sampled layers train and are perturbed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align_helpers import (accumulation_matches, assert_grads_close, attention_output_grads, batch, grads,  # noqa: F401
                           make_ctx, organism, second_arch_trains, vaccine_direct)

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses import t_vaccine
from hftlab.defenses.t_vaccine import Config, TVaccine, layer_probabilities, layer_scores, sample_layers, sampled_count
from hftlab.models.introspect import attention_modules, layer_index_of
from hftlab.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def test_scores_are_harmful_gradient_norms(organism, fmt):
    hb = batch(fmt, "harmful", n=3)
    want = torch.stack([g.norm() for g in attention_output_grads(organism, hb)])
    got = layer_scores(organism, hb, attention_modules(organism))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in organism.parameters())
    torch.testing.assert_close(layer_probabilities(got), want / want.sum())


def test_sampling_is_in_proportion_to_the_scores():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample_layers(probs, 1, gen)[0]] += 1
    torch.testing.assert_close(counts / n, probs, atol=0.03, rtol=0)
    for _ in range(20):
        picked = sample_layers(probs, 3, gen)
        assert len(set(picked)) == 3 and picked == sorted(picked)
    # a layer of zero score can still be drawn when k exceeds the non-zero ones (never an error)
    assert len(sample_layers(torch.tensor([0.0, 0.0, 1.0, 0.0]), 2, gen)) == 2


def test_only_sampled_attention_trains_and_is_perturbed(organism, fmt):
    b = batch(fmt)
    d = TVaccine(layers=2, paper_depth=0, rho=3.0)
    ctx = make_ctx(fmt)
    d.setup(organism, ctx)
    d.active = [1, 3]
    d._activate()
    d.backward(organism, b, ctx)
    got = grads(organism)
    owner = layer_index_of(organism)
    frozen = {n for n, _ in organism.named_parameters() if ".self_attn." in n and owner.get(n) not in (1, 3)}
    assert frozen and got and not frozen & set(got), "the other layers' attention gets no gradient"
    assert {n for n, _ in organism.named_parameters()} - frozen == set(got), "everything else trains (MLPs too)"
    for n, p in organism.named_parameters():
        p.requires_grad_(n not in frozen)
    e, want = vaccine_direct(organism, b, 3.0, layers=[1, 3])
    torch.testing.assert_close(torch.sqrt(sum((x ** 2).sum() for x in e)), torch.tensor(3.0, dtype=torch.float64),
                               rtol=1e-6, atol=0)  # ρ·g/(‖g‖ + 1e-7): 3 − 5e-7
    assert_grads_close(got, want)
    d.teardown(organism, ctx)
    assert all(p.requires_grad for p in organism.parameters())
    assert all(getattr(layer, "gradient_checkpointing", False) is False for layer in organism.model.layers)


def test_schedule_scores_every_k_and_samples_every_j(organism, fmt, monkeypatch):
    calls = {"score": [], "sample": []}
    score, sample = t_vaccine.layer_scores, t_vaccine.sample_layers
    ctx = make_ctx(fmt)
    monkeypatch.setattr(t_vaccine, "layer_scores", lambda *a: calls["score"].append(ctx.step) or score(*a))
    monkeypatch.setattr(t_vaccine, "sample_layers", lambda *a: calls["sample"].append(ctx.step) or sample(*a))
    d = TVaccine(interval=2, score_interval=4)
    train(organism, fmt.encode_all(ctx.data["alignment"]), TrainConfig(max_steps=6, batch_size=4), defense=d,
          ctx=ctx)
    assert calls == {"score": [0, 4], "sample": [0, 2, 4]}
    assert all(p.requires_grad for p in organism.parameters())


def test_frozen_layers_are_checkpointed(organism, fmt):
    d = TVaccine(layers=1, paper_depth=0)
    d.setup(organism, make_ctx(fmt))
    flags = [layer.gradient_checkpointing for layer in organism.model.layers]
    assert flags == [i not in d.active for i in range(4)]
    d.teardown(organism, make_ctx(fmt))


def test_sampled_count_scales_with_depth():
    assert sampled_count(Config(), 32) == 8
    assert sampled_count(Config(), 4) == 1
    assert sampled_count(Config(layers=8, paper_depth=0), 4) == 4
    assert sampled_count(Config(layers=3, paper_depth=0), 4) == 3


def test_gradient_accumulation(organism, fmt):
    def fix_layers(d, m, ctx):
        d.active = [0, 2]
        d._activate()

    accumulation_matches(lambda: TVaccine(layers=2, paper_depth=0), organism, fmt, fix_layers)


def test_missing_harmful_set(organism, fmt):
    with pytest.raises(ValueError, match="t-vaccine: needs the provider's 'harmful' set"):
        TVaccine().setup(organism, make_ctx(fmt, harmful=False))


@pytest.mark.parametrize("lora", [False, True])
def test_second_architecture(organism_tokenizer, lora):
    second_arch_trains(TVaccine(interval=1, score_interval=1), organism_tokenizer, lora)


def test_paper_defaults_file():
    p = load_config([CONFIGS / "t-vaccine.yaml"]).defense.params
    assert (p["layers"], p["interval"], p["score_interval"], p["rho"]) == (8, 20, 200, 3.0)
