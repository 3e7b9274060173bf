"""AsFT: the penalty Σ‖(I − C)·B·A‖_F² with C = V·Vᵀ/‖V‖_F, V = W_aligned − W_base, against a direct
computation from the models' weights, and the loss ℓ + λ·penalty with its gradient (LoRA and full)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import assert_grads_close, grads, loss_of, organism  # noqa: F401
from finetune_helpers import SOURCE, perturbed, user_batch

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.asft import AsFT
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _ctx(fmt, aligned, base):
    loaders = {"aligned": lambda: copy.deepcopy(aligned), "base": lambda: copy.deepcopy(base)}
    return Context(stage="finetune", formatter=fmt, data={"user": SOURCE.task("sentiment", "train", 8)},
                   loaders=loaders, batch_size=4)


def _linear(model, layer, proj):
    return getattr(model.model.layers[layer].self_attn, proj).weight.detach()


def _direct(model, aligned, base, lam, b):
    """ℓ + λ·Σ over the LoRA layers of ‖(I − V·Vᵀ/‖V‖_F)·B·A‖_F², written from the weights by name."""
    reg = 0.0
    for layer in range(len(base.model.layers)):
        for proj in ("q_proj", "k_proj", "v_proj"):
            v = _linear(aligned, layer, proj) - _linear(base, layer, proj)
            c = v @ v.T / torch.sqrt((v ** 2).sum())
            mod = getattr(model.base_model.model.model.layers[layer].self_attn, proj)
            delta = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            reg = reg + (((torch.eye(c.shape[0], dtype=c.dtype) - c) @ delta) ** 2).sum()
    return loss_of(model, b) + lam * reg, reg


def _lora_policy(organism):
    """The aligned organism with a LoRA adapter on q, k, v whose B is non-zero (a fine-tuned adapter)."""
    model = add_lora(copy.deepcopy(organism), TrainConfig(lora=True, lora_r=4))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_loss_and_gradient_lora(organism, fmt):
    base = perturbed(organism, 0.02, seed=5)  # V = aligned − base is not zero anywhere
    model = _lora_policy(organism)
    b = user_batch(fmt)
    d = AsFT(lam=3.0)
    d.setup(model, _ctx(fmt, organism, base))
    assert len(d.terms) == 3 * len(organism.model.layers)
    loss = d.backward(model, b, Context(stage="finetune"))
    got = grads(model)

    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    want, reg = _direct(m, organism, base, 3.0, b)
    want.backward()
    assert_grads_close(got, grads(m))
    torch.testing.assert_close(loss.double(), want.detach().double(), rtol=1e-6, atol=0)
    assert 3.0 * float(reg.detach()) > 0.05 * float(want.detach()), "the penalty is a real part of the loss"


def test_anchor_uses_the_frobenius_norm(organism, fmt):
    """V = s·u·vᵀ (unit u, v) in one layer, zero elsewhere: C = V·Vᵀ/‖V‖_F = s·u·uᵀ, so (I − C)·u = (1 − s)·u
    (‖V‖_F², an exact projector, would give 0); a layer with V = 0 has I − C = I."""
    s = 0.3
    g = torch.Generator().manual_seed(0)
    base = copy.deepcopy(organism)
    w = base.model.layers[1].self_attn.v_proj.weight
    u = torch.randn(w.shape[0], generator=g, dtype=w.dtype)
    v = torch.randn(w.shape[1], generator=g, dtype=w.dtype)
    u, v = u / u.norm(), v / v.norm()
    with torch.no_grad():
        w.sub_(s * torch.outer(u, v))  # aligned − base = s·u·vᵀ
    d = AsFT()
    d.setup(_lora_policy(organism), _ctx(fmt, organism, base))
    r = {name: res for name, _, res in d.terms}
    torch.testing.assert_close(r["1.self_attn.v_proj"] @ u, (1 - s) * u, rtol=1e-9, atol=1e-12)
    eye = torch.eye(r["0.self_attn.q_proj"].shape[0], dtype=w.dtype)
    assert torch.equal(r["0.self_attn.q_proj"], eye) and torch.equal(r["1.self_attn.q_proj"], eye)


def test_no_penalty_for_a_fresh_adapter(organism, fmt):
    base = perturbed(organism, 0.02, seed=5)
    model = add_lora(copy.deepcopy(organism), TrainConfig(lora=True, lora_r=4))  # B = 0
    d = AsFT(lam=100.0)
    d.setup(model, _ctx(fmt, organism, base))
    b = user_batch(fmt)
    loss = d.backward(model, b, Context(stage="finetune"))
    torch.testing.assert_close(loss.double(), loss_of(model, b).detach().double(), rtol=1e-6, atol=0)


def test_full_fine_tuning_penalises_the_whole_update(organism, fmt):
    base = perturbed(organism, 0.02, seed=5)
    model = copy.deepcopy(organism)
    d = AsFT(lam=2.0)
    d.setup(model, _ctx(fmt, organism, base))
    moved = perturbed(organism, 0.01, seed=7)
    with torch.no_grad():
        for p, q in zip(model.parameters(), moved.parameters()):
            p.copy_(q)
    b = user_batch(fmt)
    d.backward(model, b, Context(stage="finetune"))
    got = grads(model)

    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    reg = 0.0
    for layer in range(len(base.model.layers)):
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            get = lambda mod: mod.model.layers[layer].get_submodule(path).weight  # noqa: E731
            v = get(organism).detach() - get(base).detach()
            c = v @ v.T / torch.sqrt((v ** 2).sum())
            reg = reg + (((torch.eye(c.shape[0], dtype=c.dtype) - c) @ (get(m) - get(organism).detach())) ** 2).sum()
    (loss_of(m, b) + 2.0 * reg).backward()
    assert len(d.terms) == 7 * len(organism.model.layers)
    assert_grads_close(got, grads(m))


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "asft.yaml"])
    assert cfg.defense.name == "asft"
    assert AsFT(**cfg.defense.params).cfg == AsFT().cfg
