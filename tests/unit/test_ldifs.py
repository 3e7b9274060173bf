"""LDIFS: the feature distance to the frozen aligned model against a direct per-token computation,
padding excluded, and the loss ℓ + λ·distance with its gradient."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import assert_grads_close, grads, organism  # noqa: F401
from finetune_helpers import make_ctx, perturbed, spread_batch, user_batch

from hftlab.config import load_config
from hftlab.data.format import Formatter
from hftlab.defenses.base import batch_pieces
from hftlab.defenses.ldifs import LDIFS, feature_distance

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _features(model, ids):
    """Hidden states of ONE unpadded sequence: embeddings + every layer (the HF convention)."""
    return model(input_ids=ids[None], output_hidden_states=True).hidden_states


def _direct_distance(policy, aligned, b):
    """Σ_l Σ_t ‖φ_l(w)[t] − φ_l(w_aligned)[t]‖², each sequence run alone (no padding), mean over rows."""
    total = 0.0
    for row in range(b["input_ids"].shape[0]):
        ids = b["input_ids"][row][b["attention_mask"][row].bool()]
        for h, r in zip(_features(policy, ids), _features(aligned, ids)):
            for t in range(len(ids)):
                total = total + ((h[0, t] - r[0, t]) ** 2).sum()
    return total / b["input_ids"].shape[0]


def test_feature_distance_matches_direct_computation(organism, fmt):
    policy = perturbed(organism, 0.02)
    b = user_batch(fmt, n=5)
    assert (b["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        out = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        ref = organism(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        got = feature_distance(out.hidden_states, ref.hidden_states, b["attention_mask"])
        want = _direct_distance(policy, organism, b)
    assert len(out.hidden_states) == organism.config.num_hidden_layers + 1
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spread", [False, True])
def test_loss_and_gradient(organism, fmt, spread):
    lam = 1e-2
    organism = copy.deepcopy(organism).double()  # float64: the direct path runs rows alone, so its rounding
    policy = perturbed(organism, 0.02)  # differs from the batched one; the comparison is of the maths
    b = spread_batch(fmt) if spread else user_batch(fmt)
    assert len(batch_pieces(policy, b)) > spread  # spread: the length-grouped path on CPU
    ctx = make_ctx(fmt, aligned=organism)
    d = LDIFS(lam=lam)
    d.setup(policy, ctx)
    loss = d.backward(policy, b, ctx)
    got = grads(policy)

    m = copy.deepcopy(policy)
    m.zero_grad(set_to_none=True)
    want = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    want = want + lam * _direct_distance(m, organism, b)
    want.backward()
    torch.testing.assert_close(loss, want.detach().to(loss.dtype), rtol=1e-4, atol=1e-6)  # HF's CE is float32
    assert_grads_close(got, grads(m))
    assert all(p.grad is None for p in ctx.reference("aligned").parameters()), "the aligned copy stays frozen"


def test_no_distance_at_the_aligned_model(organism, fmt):
    b = user_batch(fmt)
    ctx = make_ctx(fmt, aligned=organism)
    model = copy.deepcopy(organism)
    loss = LDIFS(lam=1.0).backward(model, b, ctx)
    plain = organism(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-6, atol=1e-7, check_dtype=False)  # HF's loss is float32


def _mlp_outputs(model, b):
    """Each decoder layer's MLP output, read directly from the modules (``model.model.layers[i].mlp``)."""
    outs = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, _i, o: outs.append(o)) for layer in model.model.layers]
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return outs


def test_git_disl_variant_loss_and_gradient(organism, fmt):
    """ℓ + Σ_l (ρ/2)·‖a_l − a_l^ref‖² over MLP outputs (batch sum, padding excluded), each layer kept only
    when its term is below ``drop``: checked against a direct computation with a drop that splits the layers."""
    rho = 0.5
    organism = copy.deepcopy(organism).double()
    policy = perturbed(organism, 0.02)
    b = user_batch(fmt, n=5)
    mask = b["attention_mask"].unsqueeze(-1).double()
    with torch.no_grad():
        terms = [rho / 2 * (((a - r) ** 2) * mask).sum() for a, r in zip(_mlp_outputs(policy, b), _mlp_outputs(organism, b))]
    ordered = sorted(float(t) for t in terms)
    drop = (ordered[1] + ordered[2]) / 2  # two layers kept, two dropped
    ctx = make_ctx(fmt, aligned=organism)
    d = LDIFS(lam=rho, variant="git-disl", drop=drop)
    d.setup(policy, ctx)
    loss = d.backward(policy, b, ctx)
    got = grads(policy)
    assert ctx.step_metrics["ldifs_layers_kept"] == 2

    m = copy.deepcopy(policy)
    m.zero_grad(set_to_none=True)
    want = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    for a, r, t in zip(_mlp_outputs(m, b), _mlp_outputs(organism, b), terms):
        if float(t) < drop:
            want = want + rho / 2 * (((a - r.detach()) ** 2) * mask).sum()
    want.backward()
    torch.testing.assert_close(loss, want.detach().to(loss.dtype), rtol=1e-6, atol=1e-9)
    assert_grads_close(got, grads(m))


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "ldifs.yaml"])
    assert LDIFS(**cfg.defense.params).cfg == LDIFS().cfg
