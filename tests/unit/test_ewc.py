"""EWC: the diagonal Fisher of the alignment data against a direct per-batch computation, and the loss
ℓ + λ·Σ F (θ − θ*)² with its gradient (also under gradient accumulation and with LoRA)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from align_helpers import accumulation_matches, assert_grads_close, grads, loss_of, organism, param_grads  # noqa: F401
from finetune_helpers import SOURCE, loss_and_grads, make_ctx, perturbed, user_batch

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.defenses.ewc import EWC
from hftlab.models.loading import add_lora

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"
N_FISHER, FISHER_BS = 12, 5  # batches of 5, 5 and 2 rows


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _ctx(fmt):
    return make_ctx(fmt, data={"alignment": SOURCE.alignment(64), "user": SOURCE.task("sentiment", "train", 8)})


def _direct_fisher(model, fmt):
    """Σ over the first 12 alignment rows in batches of 5 (in order) of the squared gradient of each
    batch's plain (one padded forward) mean loss, one backward per batch on a fresh copy."""
    rows = SOURCE.alignment(64)[:N_FISHER]
    fisher = {}
    for i in range(0, N_FISHER, FISHER_BS):
        b = fmt.collate(fmt.encode_all(rows[i: i + FISHER_BS]))
        for n, g in loss_and_grads(model, lambda m: loss_of(m, b))[1].items():
            fisher[n] = fisher.get(n, 0) + g ** 2
    return fisher


def _setup(model, fmt):
    d = EWC(fisher_samples=N_FISHER, fisher_batch_size=FISHER_BS)
    d.setup(model, _ctx(fmt))
    return d


def test_fisher_matches_direct_computation(organism, fmt):
    d = _setup(organism, fmt)
    want = _direct_fisher(organism, fmt)
    got = dict(zip([n for n, p in organism.named_parameters() if p.requires_grad], d.fisher))
    assert_grads_close(got, want)
    assert all(p.grad is None for p in organism.parameters()), "the Fisher pass leaves no gradient behind"
    assert all(torch.equal(a, p) for a, p in zip(d.anchor, organism.parameters())), "θ* = the start"


def test_loss_and_gradient(organism, fmt):
    d = _setup(organism, fmt)
    fisher = _direct_fisher(organism, fmt)
    start = {n: p.detach().clone() for n, p in organism.named_parameters()}
    moved = perturbed(organism, 0.02)
    with torch.no_grad():
        for p, q in zip(organism.parameters(), moved.parameters()):
            p.copy_(q)
    b = user_batch(fmt)
    # λ such that the penalty's gradient is as large as the task's: both terms are tested
    task = {n: g for n, g in param_grads(organism, lambda m: loss_of(m, b)).items()}
    pull = torch.sqrt(sum(((2 * fisher[n] * (p.detach() - start[n])) ** 2).sum()
                          for n, p in organism.named_parameters()))
    lam = float(torch.sqrt(sum((g ** 2).sum() for g in task.values())) / pull)
    d.cfg.lam = lam
    ctx = _ctx(fmt)
    loss = d.backward(organism, b, ctx)
    got = grads(organism)

    def direct(m):
        reg = sum((fisher[n] * (p - start[n]) ** 2).sum() for n, p in m.named_parameters())
        return loss_of(m, b) + lam * reg

    want_loss, want = loss_and_grads(organism, direct)
    assert_grads_close(got, want)
    torch.testing.assert_close(loss.double(), want_loss.detach().double(), rtol=1e-5, atol=0)  # HF: float32
    assert float(ctx.step_metrics["ewc_penalty"]) > 0.1 * float(loss), "the penalty is a real part of the loss"


def test_no_penalty_at_the_start(organism, fmt):
    d = _setup(organism, fmt)
    d.cfg.lam = 1e12
    b = user_batch(fmt)
    loss = d.backward(organism, b, _ctx(fmt))
    want = param_grads(organism, lambda m: loss_of(m, b))
    assert_grads_close(grads(organism), want)
    torch.testing.assert_close(loss.double(), loss_of(organism, b).detach().double(), rtol=1e-5, atol=0)


def test_lora_fisher_covers_only_the_adapter(organism, fmt):
    """A fresh adapter (B = 0): A has a zero gradient, hence a zero Fisher; B a positive one."""
    model = add_lora(organism, TrainConfig(lora=True, lora_r=4))
    d = _setup(model, fmt)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    fisher = dict(zip(names, d.fisher))
    assert all(float(f.abs().max()) == 0 for n, f in fisher.items() if "lora_A" in n)
    assert all(float(f.min()) >= 0 and float(f.max()) > 0 for n, f in fisher.items() if "lora_B" in n)


def test_gradient_accumulation(organism, fmt):
    def move(d, m, ctx):  # away from θ*, the same way in every run, so that the penalty acts
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        d.cfg.lam = 1e3 / float(sum(f.sum() for f in d.fisher))

    accumulation_matches(lambda: EWC(fisher_samples=N_FISHER, fisher_batch_size=FISHER_BS), organism, fmt,
                         prepare=move)


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "ewc.yaml"])
    assert cfg.defense.name == "ewc"
    assert EWC(**cfg.defense.params).cfg == EWC().cfg
