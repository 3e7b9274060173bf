"""Constrained SFT: per-token β schedule, the loss against a direct per-row computation (the reference's
``soft_sft_loss``), its gradient against the paper's objective, and plain SFT at the start."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from align_helpers import assert_grads_close, grads, organism  # noqa: F401
from finetune_helpers import make_ctx, perturbed, spread_batch, user_batch

from hftlab.config import load_config
from hftlab.data.format import IGNORE, Formatter
from hftlab.defenses.base import batch_pieces
from hftlab.defenses.constrained_sft import Config, ConstrainedSFT, constrained_loss, token_betas

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def test_beta_schedule():
    # rows: 7 response tokens after a 2-token prompt; 3 tokens; 1 token; none
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 2:9] = True
    mask[1, 5:8] = True
    mask[2, 9] = True
    b = 0.1
    beta = token_betas(mask, Config(beta=b))
    torch.testing.assert_close(beta[0, 2:9], torch.tensor([b * 5, b * 20, b * 20, b * 20, b * 20, b, b]))
    torch.testing.assert_close(beta[1, 5:8], torch.tensor([b * 5, b * 20, b * 20]))
    torch.testing.assert_close(beta[2, 9], torch.tensor(b * 5))
    flat = token_betas(mask, Config(beta=b, bias_length=0))
    assert torch.all(flat[mask] == b)


def _direct_loss(logits, ref_logits, labels, beta=0.1, bias=20.0, first=5.0, length=5):
    """The reference's per-row loop: labelled log-probs in order, its β list, detached clamped weights."""
    losses = []
    for row in range(labels.shape[0]):
        lab = labels[row, 1:]
        keep = lab != IGNORE
        pol = torch.log_softmax(logits[row, :-1], -1)[keep].gather(1, lab[keep, None])[:, 0]
        ref = torch.log_softmax(ref_logits[row, :-1], -1)[keep].gather(1, lab[keep, None])[:, 0]
        betas = [beta * (first if t == 0 else bias) if t < length else beta for t in range(len(pol))]
        betas = torch.tensor(betas)
        w = (2 * (1 - torch.sigmoid(betas * (pol - ref)))).detach().clamp(min=1e-3)
        losses.append(w * pol)
    return -torch.cat(losses).mean()


def _paper_objective(logits, ref_logits, labels, beta=0.1, bias=20.0, first=5.0, length=5):
    """Eq. 3 of the paper: mean over response tokens of (2/β_t)·log(1 + exp(−β_t·Δ_t))."""
    terms = []
    for row in range(labels.shape[0]):
        lab = labels[row, 1:]
        keep = lab != IGNORE
        pol = torch.log_softmax(logits[row, :-1], -1)[keep].gather(1, lab[keep, None])[:, 0]
        ref = torch.log_softmax(ref_logits[row, :-1], -1)[keep].gather(1, lab[keep, None])[:, 0].detach()
        betas = torch.tensor([beta * (first if t == 0 else bias) if t < length else beta for t in range(len(pol))])
        terms.append(2 / betas * F.softplus(-betas * (pol - ref)))
    return torch.cat(terms).mean()


def test_loss_matches_direct_computation(organism, fmt):
    policy = perturbed(organism, 0.05)
    b = user_batch(fmt, n=6)
    with torch.no_grad():
        logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref_logits = organism(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    got = constrained_loss(logits, ref_logits, b["labels"], Config())
    want = _direct_loss(logits, ref_logits, b["labels"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    assert not torch.allclose(got, plain, rtol=1e-3), "weights must differ from 1 once the policy moved"


@pytest.mark.parametrize("spread", [False, True])
def test_backward_gradient_is_the_papers_objective_gradient(organism, fmt, spread):
    policy = perturbed(organism, 0.05)
    b = spread_batch(fmt) if spread else user_batch(fmt, n=6)
    assert len(batch_pieces(policy, b)) > spread  # spread: the length-grouped path on CPU
    ctx = make_ctx(fmt, aligned=organism)
    d = ConstrainedSFT()
    d.setup(policy, ctx)
    loss = d.backward(policy, b, ctx)
    got = grads(policy)

    m = copy.deepcopy(policy)
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_logits = organism(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    _paper_objective(logits, ref_logits, b["labels"]).backward()
    assert_grads_close(got, grads(m))
    torch.testing.assert_close(loss, _direct_loss(logits.detach(), ref_logits, b["labels"]), rtol=1e-5, atol=1e-6)


def test_equals_sft_when_policy_is_the_reference(organism, fmt):
    b = user_batch(fmt)
    ctx = make_ctx(fmt, aligned=organism)
    d = ConstrainedSFT()
    model = copy.deepcopy(organism)
    loss = d.backward(model, b, ctx)
    got = grads(model)
    m = copy.deepcopy(organism)
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    # SFT's loss, in float64 (HF's own loss would cast the logits to float32)
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    plain.backward()
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-10, atol=0)
    assert_grads_close(got, grads(m))


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "constrained-sft.yaml"])
    assert ConstrainedSFT(**cfg.defense.params).cfg == ConstrainedSFT().cfg
