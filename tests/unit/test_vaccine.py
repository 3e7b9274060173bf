"""Vaccine: the perturbation has norm ρ over all layers jointly, is added to every attention output,
and only the perturbed loss's gradient is applied; pass 1 computes no weight gradient."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import (SOURCE, accumulation_matches, assert_grads_close, attention_output_grads, batch, grads,  # noqa: F401
                           logged_steps, make_ctx, mixed_batch, organism, second_arch_trains, tiny_gpt2, vaccine_direct)

from hftlab.config import ConfigError, TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.perturbation import effective_rho, shifted, vaccine_shifts
from hftlab.defenses.vaccine import Vaccine
from hftlab.models.introspect import attention_modules
from hftlab.models.loading import add_lora

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def test_perturbation_has_global_norm_rho(organism, fmt):
    b = batch(fmt)
    g = attention_output_grads(organism, b)
    e = vaccine_shifts(organism, b, attention_modules(organism), rho=2.0)
    assert all(p.grad is None for p in organism.parameters()), "pass 1 must not compute weight gradients"
    joint = torch.sqrt(sum((x ** 2).sum() for x in e))
    torch.testing.assert_close(joint, torch.tensor(2.0, dtype=joint.dtype), rtol=1e-5, atol=0)
    per_layer = [x.norm() for x in e]
    assert max(per_layer) < 2.0 - 1e-3, "each layer must be scaled by the one global norm, not its own"
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    for x, gl in zip(e, g):
        torch.testing.assert_close(x, 2.0 * gl / norm, rtol=1e-4, atol=1e-8)


def test_shift_is_added_to_every_attention_output(organism, fmt):
    b = batch(fmt)
    mods = attention_modules(organism)
    e = [torch.randn(b["input_ids"].shape + (organism.config.hidden_size,), dtype=organism.dtype) for _ in mods]

    def outputs(inside_shift: bool) -> list[torch.Tensor]:
        seen = []

        def run():
            hs = [m.register_forward_hook(lambda _m, _i, o: seen.append(o[0].detach().clone())) for m in mods]
            with torch.no_grad():
                organism(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            for h in hs:
                h.remove()

        if inside_shift:
            with shifted(mods, e):  # our hooks run after the defense's: they see the shifted output
                run()
        else:
            run()
        return seen

    clean, shifted_out = outputs(False), outputs(True)
    assert len(shifted_out) == len(mods)
    # layer 0 sees the same input in both runs: its output differs by exactly e_0
    torch.testing.assert_close(shifted_out[0] - clean[0], e[0], rtol=1e-5, atol=1e-5)
    assert all(not torch.allclose(s, c) for s, c in zip(shifted_out, clean))


@pytest.mark.parametrize("rho, mixed", [(2.0, False), (0.0, False), (2.0, True)])
def test_backward_is_the_perturbed_loss_gradient(organism, fmt, rho, mixed):
    b = mixed_batch(fmt) if mixed else batch(fmt)  # mixed: both passes run as length groups
    _, want = vaccine_direct(organism, b, rho)
    d = Vaccine(rho=rho)
    ctx = make_ctx(fmt)
    d.setup(organism, ctx)
    loss = d.backward(organism, b, ctx)
    assert loss.requires_grad is False and torch.isfinite(loss)
    assert_grads_close(grads(organism), want)
    if rho:
        _, clean = vaccine_direct(organism, b, 0.0)
        assert any(not torch.allclose(want[n], clean[n]) for n in want), "ρ=2 must change the gradient"


def test_unperturbed_loss_logged_below_the_perturbed_one(organism, fmt, tmp_path):
    """losses.jsonl has the perturbed loss (the one trained on) and pass 1's unperturbed loss; the
    perturbation is an ascent step, so the first is the larger."""
    for r in logged_steps(Vaccine(rho=2.0), organism, fmt, tmp_path):
        assert r["loss"] > r["unperturbed_loss"] > 0


def test_gradient_accumulation(organism, fmt):
    accumulation_matches(lambda: Vaccine(rho=2.0), organism, fmt)


def test_lora_gradient_matches(organism, fmt):
    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(organism), TrainConfig(lora=True, lora_r=4))
    with torch.no_grad():  # non-zero B so that the adapter changes the forward
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = batch(fmt)
    _, want = vaccine_direct(model, b, 2.0)
    d = Vaccine(rho=2.0)
    d.setup(model, make_ctx(fmt))
    d.backward(model, b, make_ctx(fmt))
    assert all("lora_" in n for n in want)
    assert_grads_close(grads(model), want)


@pytest.mark.parametrize("lora", [False, True])
def test_second_architecture(organism_tokenizer, fmt, lora):
    second_arch_trains(Vaccine(), organism_tokenizer, lora)
    model = tiny_gpt2(len(organism_tokenizer), organism_tokenizer.pad_token_id)  # GPT-2: tuple outputs, Conv1D
    if lora:
        model = add_lora(model, TrainConfig(lora=True, lora_r=4))
    b = batch(fmt)
    _, want = vaccine_direct(model, b, 2.0)
    d = Vaccine(rho=2.0)
    d.setup(model, make_ctx(fmt))
    d.backward(model, b, make_ctx(fmt))
    assert_grads_close(grads(model), want)


def test_bad_rho_is_a_config_error():
    with pytest.raises(ConfigError, match="defense.rho"):
        load_config(overrides=["defense=vaccine", "defense.rho=-1"])
    with pytest.raises(ValueError, match="rho"):
        Vaccine(rho=-0.5)


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "vaccine.yaml"])
    assert cfg.defense.name == "vaccine" and cfg.defense.params["rho"] == 2.0


def test_per_example_scale_equals_rho_at_the_reference_batch():
    assert effective_rho(2.0, 5, 5) == 2.0  # the paper's shape: ρ itself
    assert effective_rho(2.0, 0, 32) == 2.0  # default: the reference's per-micro-batch ρ
    assert effective_rho(2.0, 5, 20) == pytest.approx(4.0)  # ρ·√(20/5)


@pytest.mark.parametrize("rows", [5, 20])
def test_rho_batch_keeps_each_examples_perturbation_at_the_reference_scale(organism, fmt, rows):
    """B identical rows share the joint norm equally: each row's perturbation is ρ_eff/√B, which with
    rho_batch=5 is the reference's ρ/√5 at any B (and without it shrinks as 1/√B)."""
    one = fmt.encode_all(SOURCE.alignment(4)[:1])
    b = fmt.collate([one[0]] * rows)
    e = vaccine_shifts(organism, b, attention_modules(organism), rho=effective_rho(2.0, 5, rows))
    per_row = torch.sqrt(sum((x ** 2).sum(dim=tuple(range(1, x.dim()))) for x in e))
    torch.testing.assert_close(per_row, torch.full((rows,), 2.0 / 5 ** 0.5, dtype=per_row.dtype), rtol=1e-4, atol=0)


@pytest.mark.parametrize("override", ["defense.rho_batch=-1", "defense.rho_batch=abc"])
def test_bad_rho_batch_is_a_config_error(override):
    with pytest.raises(ConfigError, match="rho_batch"):
        load_config(overrides=["defense=vaccine", override])
