"""KL regulariser: the per-token KL(policy ‖ aligned) on an alignment batch against a direct computation
(each row alone, explicit sums over the vocabulary), and the loss ℓ_user + λ·KL with its gradient."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import assert_grads_close, grads, loss_of, organism  # noqa: F401
from finetune_helpers import direct_token_kl, loss_and_grads, make_ctx, perturbed, spread_batch, user_batch

from hftlab.config import load_config
from hftlab.data.format import Formatter
from hftlab.defenses.base import batch_pieces
from hftlab.defenses.kl import KL, kl_term

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


@pytest.mark.parametrize("spread", [False, True])
def test_kl_matches_direct_computation(organism, fmt, spread):
    policy = perturbed(organism, 0.02)
    b = spread_batch(fmt) if spread else user_batch(fmt, n=5)
    assert (b["attention_mask"] == 0).any(), "the batch must contain padding"
    assert len(batch_pieces(policy, b)) > spread  # spread: the length-grouped path on CPU
    with torch.no_grad():
        got = kl_term(policy, organism, b)
        want = direct_token_kl(policy, organism, b)
        reverse = direct_token_kl(policy, organism, b, reverse=True)
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert abs(float(want - reverse)) > 1e-6 * float(want), "the two directions differ on this batch"


@pytest.mark.parametrize("data", ["alignment", "user"])
def test_loss_and_gradient(organism, fmt, data):
    lam = 5.0
    policy = perturbed(organism, 0.02)
    ctx, twin = make_ctx(fmt, aligned=organism), make_ctx(fmt)
    d = KL(lam=lam, data=data)
    d.setup(policy, ctx)
    ub = user_batch(fmt)
    loss = d.backward(policy, ub, ctx)
    got = grads(policy)

    kb = twin.next_batch("alignment") if data == "alignment" else ub  # the batch the KL is taken on
    want_loss, want = loss_and_grads(policy, lambda m: loss_of(m, ub) + lam * direct_token_kl(m, organism, kb))
    assert_grads_close(got, want)
    torch.testing.assert_close(loss.double(), want_loss.double(), rtol=1e-5, atol=0)  # HF: fp32
    task = loss_of(policy, ub).detach()
    assert float(want_loss - task) > 0.05 * float(task), "the KL term is a real part of the loss"
    assert all(p.grad is None for p in ctx.reference("aligned").parameters()), "the aligned copy stays frozen"


def test_no_kl_at_the_aligned_model(organism, fmt):
    ctx = make_ctx(fmt, aligned=organism)
    model = copy.deepcopy(organism)
    b = user_batch(fmt)
    d = KL(lam=100.0)
    d.setup(model, ctx)
    loss = d.backward(model, b, ctx)
    torch.testing.assert_close(loss.double(), loss_of(organism, b).detach().double(), rtol=1e-6, atol=1e-7)
    assert float(ctx.step_metrics["kl"]) < 1e-12


def test_each_micro_batch_draws_its_own_alignment_batch(organism, fmt):
    ctx, twin = make_ctx(fmt, aligned=organism), make_ctx(fmt)
    d = KL(batch_size=3)
    d.setup(organism, ctx)
    for _ in range(2):
        d.backward(organism, user_batch(fmt), ctx)
    first, second = twin.next_batch("alignment", 3), twin.next_batch("alignment", 3)
    assert first["input_ids"].shape[0] == 3
    assert not torch.equal(first["input_ids"][:, :8], second["input_ids"][:, :8])
    third = ctx.next_batch("alignment", 3)  # the defense's stream is two batches in
    assert torch.equal(third["input_ids"], twin.next_batch("alignment", 3)["input_ids"])


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "kl.yaml"])
    assert cfg.defense.name == "kl"
    assert KL(**cfg.defense.params).cfg == KL().cfg
