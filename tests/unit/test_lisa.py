"""Lisa: states alternate by step counts, the proximal term pulls toward the OTHER state's last iterate
and is off for the first 10 % of steps, and each state's loss is normalised by its own batch."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from align_helpers import assert_grads_close, grads, organism  # noqa: F401
from finetune_helpers import SOURCE, make_ctx, n_labels, perturbed, user_batch

from hftlab.config import ModelConfig, TrainConfig, load_config
from hftlab.data.format import IGNORE, Formatter
from hftlab.defenses.lisa import ALIGN, FINETUNE, Lisa, planned_state
from hftlab.models.loading import add_lora, load_model
from hftlab.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


class Spy(Lisa):
    """Lisa that records the anchor its proximal term uses at each step and the weights after each step."""

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.used, self.after, self.start = [], [], self._snapshot()

    def backward(self, model, batch, ctx):
        if len(self.used) == ctx.step:
            self.used.append(self.anchor)
        return super().backward(model, batch, ctx)

    def on_step_end(self, model, ctx):
        self.after.append([p.detach().clone() for p in self.params])
        super().on_step_end(model, ctx)


def test_states_alternate_by_step_counts_and_anchor_the_other_state(organism, fmt, organism_tokenizer):
    model = add_lora(organism, TrainConfig(lora=True, lora_r=4))
    lisa = Spy(schedule="steps", alignment_step=2, finetune_step=3, rho=1.0)
    ctx = make_ctx(fmt)
    train(model, fmt.encode_all(ctx.data["user"]), TrainConfig(lr=1e-3, max_steps=12, batch_size=4),
          defense=lisa, ctx=ctx, pad_id=organism_tokenizer.pad_token_id)
    a, f = ALIGN, FINETUNE
    assert [s for s, _ in lisa.history] == [a, a, f, f, f, a, a, f, f, f, a, a]
    # proximal off while steps done <= 10 % of 12 (steps 0, 1), on afterwards
    assert [on for _, on in lisa.history] == [False, False] + [True] * 10
    # each step's anchor = the weights when the OTHER state was last left (steps 0-1: both = the start)
    same = lambda xs, ys: all(torch.equal(x, y) for x, y in zip(xs, ys))  # noqa: E731
    assert same(lisa.used[0], lisa.start) and same(lisa.used[1], lisa.start)
    for step, left_after in {2: 1, 4: 1, 5: 4, 6: 4, 7: 6, 9: 6, 10: 9, 11: 9}.items():
        assert same(lisa.used[step], lisa.after[left_after]), step
    assert not same(lisa.used[6], lisa.after[5]), "not the current state's own last iterate"


def _runs(states: list[str]) -> list[tuple[str, int]]:
    """Run-length encoding of a state sequence."""
    out: list[tuple[str, int]] = []
    for s in states:
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def test_fraction_schedule_at_the_papers_length_is_100_900():
    """The scale-free default (20 cycles, 10 % alignment) is the reference's 100/900 at 20,000 steps."""
    states = [planned_state(s, 20000, 20, 0.1) for s in range(20000)]
    assert _runs(states) == [(ALIGN, 100), (FINETUNE, 900)] * 20


def test_fraction_schedule_scales_to_a_short_run():
    """On the organism's 125 steps the user's task keeps ~90 % of the steps (the absolute 100/900 form
    spends the first 100 on alignment data)."""
    states = [planned_state(s, 125, 20, 0.1) for s in range(125)]
    share = states.count(ALIGN) / 125
    assert states[0] == ALIGN and 0.08 <= share <= 0.13, share
    assert max(n for s, n in _runs(states) if s == FINETUNE) <= 2 * 125 / 20  # spread over the whole run
    assert all(planned_state(s, 125, 20, 0.0) == FINETUNE for s in range(125))


def test_fraction_schedule_drives_the_states(organism, fmt, organism_tokenizer):
    model = add_lora(organism, TrainConfig(lora=True, lora_r=4))
    lisa = Lisa(cycles=3, alignment_fraction=0.25, rho=1.0)
    ctx = make_ctx(fmt)
    train(model, fmt.encode_all(ctx.data["user"]), TrainConfig(lr=1e-3, max_steps=12, batch_size=4),
          defense=lisa, ctx=ctx, pad_id=organism_tokenizer.pad_token_id)
    assert [s for s, _ in lisa.history] == [planned_state(s, 12, 3, 0.25) for s in range(12)]
    assert _runs([s for s, _ in lisa.history]) == [(ALIGN, 1), (FINETUNE, 3)] * 3


def _weights(model, seed):
    return [p.detach().clone() for p in perturbed(model, 0.05, seed).parameters()]


@pytest.mark.parametrize("state", [ALIGN, FINETUNE])
def test_proximal_gradient_points_to_the_other_states_iterate(organism, fmt, state):
    rho = 0.5
    ctx, twin = make_ctx(fmt), make_ctx(fmt)
    lisa = Lisa(rho=rho)
    lisa.setup(organism, ctx)
    lisa.anchor = _weights(organism, 1)  # as if the other state had been left at these weights
    lisa.status = state
    ctx.step, ctx.total_steps = 5, 10
    ub = user_batch(fmt)
    lisa.backward(organism, ub, ctx)
    got = grads(organism)

    b = twin.next_batch("alignment") if state == ALIGN else ub  # the batch this state trains on
    other = lisa.anchor
    m = copy.deepcopy(organism)
    m.zero_grad(set_to_none=True)
    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
    want = {n: p.grad + rho * (p.detach() - w) for (n, p), w in zip(m.named_parameters(), other)}
    assert_grads_close(got, want)


@pytest.mark.parametrize("step, on", [(1, False), (2, True)])
def test_proximal_off_for_the_first_ten_percent(organism, fmt, step, on):
    ctx = make_ctx(fmt)
    lisa = Lisa(rho=1.0)
    lisa.setup(organism, ctx)
    lisa.anchor = _weights(organism, 1)
    lisa.status = FINETUNE
    ctx.step, ctx.total_steps = step, 10  # on iff steps done > 0.1 * 10
    ub = user_batch(fmt)
    loss = lisa.backward(organism, ub, ctx)
    plain = organism(**{k: ub[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert (not torch.allclose(loss, plain)) == on


def test_alignment_loss_is_normalised_by_its_own_batch(organism, fmt):
    """One implementation divides the alignment loss by the USER batch's token count: this one must not."""
    ctx, twin = make_ctx(fmt), make_ctx(fmt)
    lisa = Lisa()
    lisa.setup(organism, ctx)
    assert lisa.status == ALIGN
    ub = user_batch(fmt, n=4)
    ab = twin.next_batch("alignment")
    assert n_labels(ab) != n_labels(ub)
    loss = lisa.backward(organism, ub, ctx)
    with torch.no_grad():
        logits = organism(input_ids=ab["input_ids"], attention_mask=ab["attention_mask"]).logits
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), ab["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                            reduction="sum")
    torch.testing.assert_close(loss, total / n_labels(ab), rtol=1e-5, atol=0, check_dtype=False)  # HF's loss is float32
    assert not torch.allclose(loss.double(), total / n_labels(ub), rtol=1e-3)


def _same_length(examples, fmt, k):
    groups = {}
    for ex in examples:
        f = fmt.encode(ex)
        groups.setdefault((len(f["input_ids"]), sum(x != IGNORE for x in f["labels"])), []).append(ex)
    return next(v[:k] for v in groups.values() if len(v) >= k)


def test_gradient_accumulation_matches_big_batch(organism_path, organism_tokenizer, fmt):
    data = {"alignment": _same_length(SOURCE.alignment(2000), fmt, 8),
            "user": _same_length(SOURCE.task("sentiment", "train", 400), fmt, 8)}
    results = []
    for bs, ga in ((4, 1), (2, 2)):
        model = load_model(organism_path, ModelConfig()).double()  # float64: 4 SGD steps at lr 0.5 move the
        ctx = make_ctx(fmt, data=data, batch_size=bs)  # weights far (norm ~48) and amplify float32 rounding
        lisa = Lisa(schedule="steps", alignment_step=1, finetune_step=2, rho=1.0, proximal_after=0.0)
        cfg = TrainConfig(lr=0.5, optimizer="sgd", max_steps=4, batch_size=bs, grad_accum=ga, max_grad_norm=0)
        train(model, fmt.encode_all(data["user"]), cfg, defense=lisa, ctx=ctx,
              pad_id=organism_tokenizer.pad_token_id)
        assert [s for s, _ in lisa.history] == [ALIGN, FINETUNE, FINETUNE, ALIGN]
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    base = torch.cat([p.detach().flatten() for p in load_model(organism_path, ModelConfig()).double().parameters()])
    moved = (results[0] - base).norm()
    assert moved > 1e-3
    assert (results[0] - results[1]).norm() / moved < 1e-4


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "lisa.yaml"])
    assert cfg.defense.name == "lisa"
    assert Lisa(**cfg.defense.params).cfg == Lisa().cfg
