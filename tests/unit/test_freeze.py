"""Freeze (SPPFT): the probe's hidden states and similarities against direct computations, the
safety-layer rule, and frozen layers left bit-identical under LoRA and full fine-tuning."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import organism  # noqa: F401
from finetune_helpers import SOURCE, make_ctx

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.freeze import Freeze, last_token_states, pair_similarities, safety_layers
from hftlab.models.introspect import layer_index_of
from hftlab.models.loading import add_lora
from hftlab.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


@pytest.mark.parametrize("gap, layers", [
    ([0.0, 0.01, 0.1, 0.2, 0.3, 0.29, 0.31], [2, 3, 4]),  # appears at 2, grows until 4, first smoothing at 5
    ([0.0, 0.2, 0.1, 0.3], [1]),
    ([0.1, -0.01, 0.06, 0.2, 0.4], [2, 3, 4]),  # an early gap that later vanishes does not count
    ([0.0, 0.01, 0.02], []),
])
def test_safety_layer_rule(gap, layers):
    assert safety_layers(gap, margin=0.05) == layers


def test_last_token_states_match_unpadded_runs(organism, fmt):
    prompts = [ex.prompt for ex in SOURCE.alignment(12)]
    ids = [fmt.ids(fmt.prompt(p)) for p in prompts]
    assert len({len(x) for x in ids}) > 1, "prompts of different lengths (padding in the batch)"
    states = last_token_states(organism, ids, fmt.tok.pad_token_id, batch_size=5)
    n_layers = organism.config.num_hidden_layers
    assert states.shape == (len(ids), n_layers, organism.config.hidden_size)
    with torch.no_grad():
        for k, x in enumerate(ids):
            hidden = organism(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states
            for layer in range(n_layers - 1):  # HF's last hidden state has the final norm applied
                torch.testing.assert_close(states[k, layer], hidden[layer + 1][0, -1], rtol=1e-4, atol=1e-5)


def test_pair_similarities():
    torch.manual_seed(0)
    n, m = torch.randn(3, 5), torch.randn(3, 5)  # one normal and one malicious direction per layer
    normal = n.expand(4, 3, 5) * torch.tensor([1.0, 2.0, 3.0, 0.5])[:, None, None]
    malicious = m.expand(6, 3, 5).clone()
    sims = pair_similarities(normal, malicious, pairs=20, seed=0)
    torch.testing.assert_close(sims["nn"], torch.ones(3))
    torch.testing.assert_close(sims["mm"], torch.ones(3))
    torch.testing.assert_close(sims["nm"], torch.cosine_similarity(n, m, dim=-1))


@pytest.mark.parametrize("lora", [True, False])
def test_frozen_layers_stay_bit_identical(organism, fmt, organism_tokenizer, lora):
    model = add_lora(organism, TrainConfig(lora=True, lora_r=4)) if lora else organism
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = make_ctx(fmt)
    train(model, fmt.encode_all(ctx.data["user"]), TrainConfig(lr=1e-2, max_steps=3, batch_size=4),
          defense=Freeze(layers="1-2"), ctx=ctx, pad_id=organism_tokenizer.pad_token_id)
    owner = layer_index_of(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    frozen = {n for n in before if owner.get(n) in (1, 2)}
    assert not changed & frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert {owner.get(n) for n in changed} >= {0, 3}, "the other layers still train"
    if lora:
        assert all("lora_" in n for n in changed)


def test_probe_freezes_the_layers_it_finds(organism, fmt):
    model = add_lora(organism, TrainConfig(lora=True, lora_r=4))
    ctx = make_ctx(fmt)
    d = Freeze(pairs=50, prompts=16, margin=0.0)
    d.setup(model, ctx)
    probe = ctx.state["safety_probe"]
    gap = [a - b for a, b in zip(probe["nn"], probe["nm"])]
    assert ctx.state["safety_layers"] == safety_layers(gap, 0.0)
    owner = layer_index_of(model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad == (owner[n] not in ctx.state["safety_layers"])


def test_layers_out_of_range_fail_before_training(organism, fmt):
    with pytest.raises(ValueError, match="defense.layers.*out of range"):
        Freeze(layers="2-9").setup(copy.deepcopy(organism), make_ctx(fmt))


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "freeze.yaml"])
    assert Freeze(**cfg.defense.params).cfg == Freeze().cfg
