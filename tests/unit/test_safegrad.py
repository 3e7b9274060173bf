"""SafeGrad: the accumulated gradient equals the direct computation of g̃_u + w·g_a, with g̃_u the user
gradient projected onto the normal plane of the alignment gradient when they conflict (both cases),
and the KL(aligned ‖ policy) alignment loss against explicit sums over the vocabulary."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align_helpers import assert_grads_close, grads, loss_of, organism, param_grads  # noqa: F401
from finetune_helpers import SOURCE, direct_token_kl, make_ctx, perturbed

from hftlab.config import load_config
from hftlab.data.format import Formatter
from hftlab.defenses.safegrad import SafeGrad, kl_to_aligned, surgery

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"
CONFLICT, AGREE = slice(4, 8), slice(0, 4)  # user batches whose gradient conflicts / agrees with g_a (probed)


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _user(fmt, rows):
    return fmt.collate(fmt.encode_all(SOURCE.harmful("attack", 8)[rows]))


@pytest.mark.parametrize("align_loss, rows, conflict", [("kl", CONFLICT, True), ("kl", AGREE, False),
                                                         ("sft", CONFLICT, True)])
def test_gradient_matches_direct_surgery(organism, fmt, align_loss, rows, conflict):
    w = 0.5
    policy = perturbed(organism, 0.02)  # away from the aligned model, so that the KL has a gradient
    ctx, twin = make_ctx(fmt, aligned=organism), make_ctx(fmt)
    d = SafeGrad(align_loss=align_loss, align_weight=w)
    d.setup(policy, ctx)
    ub = _user(fmt, rows)
    d.backward(policy, ub, ctx)
    got = grads(policy)

    ab = twin.next_batch("alignment")  # the alignment batch the defense drew

    def a_fn(m):
        return direct_token_kl(m, organism, ab, reverse=True) if align_loss == "kl" else loss_of(m, ab)

    gu, ga = param_grads(policy, lambda m: loss_of(m, ub)), param_grads(policy, a_fn)
    dot = sum((gu[n] * ga[n]).sum() for n in gu)
    assert (dot < 0) == conflict, float(dot)
    if conflict:
        na2 = sum((ga[n] ** 2).sum() for n in ga)
        gu = {n: gu[n] - dot / na2 * ga[n] for n in gu}
        assert abs(float(sum((gu[n] * ga[n]).sum() for n in gu))) < 1e-9 * float(na2)
    assert_grads_close(got, {n: gu[n] + w * ga[n] for n in gu})
    assert float(ctx.step_metrics["projected"]) == float(conflict)


def test_kl_alignment_loss_matches_direct(organism, fmt):
    policy = perturbed(organism, 0.02)
    b = fmt.collate(fmt.encode_all(SOURCE.alignment(64)[:6]))
    assert (b["attention_mask"] == 0).any()
    with torch.no_grad():
        got, want = kl_to_aligned(policy, organism, b), direct_token_kl(policy, organism, b, reverse=True)
    assert got > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_surgery_rule():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    u, cos = surgery([torch.tensor([-2.0, 3.0]), torch.tensor([5.0])], a)
    assert [x.tolist() for x in u] == [[0.0, 3.0], [5.0]] and float(cos) < 0
    u, cos = surgery([torch.tensor([2.0, 3.0]), torch.tensor([5.0])], a)  # no conflict: unchanged
    assert [x.tolist() for x in u] == [[2.0, 3.0], [5.0]] and float(cos) > 0
    u, _ = surgery([torch.tensor([-2.0, 3.0])], [torch.zeros(2)])  # g_a = 0: nothing to project on
    assert u[0].tolist() == [-2.0, 3.0]


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "safegrad.yaml"])
    assert cfg.defense.name == "safegrad"
    assert SafeGrad(**cfg.defense.params).cfg == SafeGrad().cfg
