"""RSN-Tune: the PLND neuron score against a direct deactivation (the MLP run again with the neuron's
activation zeroed), the activated/safety/foundation/robust sets against set arithmetic written here, and
the alignment gradient (only the robust safety neurons' rows and columns) against the full gradient
masked by hand; the protect-in-fine-tuning use leaves the neurons' rows/columns of the merged LoRA
update at zero on a second architecture."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from align_helpers import assert_grads_close, batch, grads, loss_of, make_ctx, organism, param_grads  # noqa: F401
from align_helpers import tiny_gpt2

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.defenses.rsn_tune import RSNTune, activated, importance
from hftlab.models.loading import add_lora, merged
from hftlab.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"
SOURCE = get_source("organism")


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _prompts(n=6):
    rows = SOURCE.alignment(64)
    return [ex.prompt for ex in rows if ex.kind == "refusal"][:n // 2] + \
        [ex.prompt for ex in rows if ex.kind != "refusal"][:n - n // 2]


def test_score_is_the_output_change_of_deactivating_the_neuron(organism, fmt):
    prompts = _prompts()
    feats = [{"input_ids": fmt.prompt_ids(p), "labels": fmt.prompt_ids(p)} for p in prompts]
    got = importance(organism, feats, fmt, batch_size=4)  # padded batches of unequal lengths
    neurons = [0, 7, 100, 383]
    for li, layer in enumerate(organism.model.layers):
        mlp = layer.mlp
        xs = {}
        h = mlp.register_forward_pre_hook(lambda m, a: xs.__setitem__("x", a[0]))
        for d, f in enumerate(feats):
            with torch.no_grad():
                organism(input_ids=torch.tensor([f["input_ids"]]))
                x = xs["x"]
                full = mlp(x)
                for k in neurons:
                    def off(_m, a, k=k):
                        a0 = a[0].clone()
                        a0[..., k] = 0
                        return (a0,)
                    hk = mlp.down_proj.register_forward_pre_hook(off)
                    want = (mlp(x) - full).norm()
                    hk.remove()
                    torch.testing.assert_close(got[li][d, k], want, rtol=1e-9, atol=1e-12)
        h.remove()


def test_sets_and_robust_neurons(organism, fmt):
    d = RSNTune(top_fraction=0.1, consistency=1.0, samples=5)
    ctx = make_ctx(fmt)
    d.setup(copy.deepcopy(organism), ctx)
    rows = ctx.data["alignment"]
    harm = [ex.prompt for ex in rows if ex.kind == "refusal"]
    gen = [ex.prompt for ex in rows if ex.kind != "refusal"]
    import random
    rng = random.Random(ctx.seed)
    harm = rng.sample(harm, 5) if len(harm) > 5 else harm
    gen = rng.sample(gen, 5) if len(gen) > 5 else gen
    enc = lambda ps: [{"input_ids": fmt.prompt_ids(p), "labels": fmt.prompt_ids(p)} for p in ps]  # noqa: E731
    s_h, s_g = importance(organism, enc(harm), fmt, 8), importance(organism, enc(gen), fmt, 8)
    k = round(0.1 * s_h[0].shape[1])
    for li in range(len(s_h)):
        top = lambda s: set.intersection(*[set(torch.argsort(r, descending=True)[:k].tolist()) for r in s])  # noqa
        safe, found = top(s_h[li]), top(s_g[li])
        assert set(activated(s_h[li], 0.1, 1.0).nonzero().flatten().tolist()) == safe
        assert ctx.state["rsn"]["neurons"][li] == sorted(safe - found)
    # a looser consistency keeps every neuron in the top set of at least half the documents
    share = activated(s_h[0], 0.1, 0.5)
    counts = torch.zeros(s_h[0].shape[1])
    for r in s_h[0]:
        counts[torch.argsort(r, descending=True)[:k]] += 1
    assert share.tolist() == (counts >= 0.5 * len(s_h[0])).tolist()


def test_alignment_gradient_only_on_robust_safety_neurons(organism, fmt):
    d = RSNTune(top_fraction=0.25, samples=20)
    ctx = make_ctx(fmt)
    full = param_grads(organism, lambda m: loss_of(m, batch(fmt)))
    model = copy.deepcopy(organism)
    d.setup(model, ctx)
    loss_of(model, batch(fmt)).backward()
    got = grads(model)
    neurons = ctx.state["rsn"]["neurons"]
    assert sum(map(len, neurons)) > 0
    want = {}
    for li, idx in enumerate(neurons):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{li}.mlp.{proj}.weight"
            mask = torch.zeros_like(full[name])
            if proj == "down_proj":
                mask[:, idx] = 1
            else:
                mask[idx, :] = 1
            want[name] = full[name] * mask
    assert_grads_close(got, want)
    d.teardown(model, ctx)


def test_two_alignment_steps_move_only_those_entries(organism_path, organism_tokenizer):
    from hftlab.config import ModelConfig
    from hftlab.models.loading import load_model

    fmt = Formatter(organism_tokenizer, max_length=96)
    model = load_model(organism_path, ModelConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = make_ctx(fmt)
    d = RSNTune(samples=20)
    train(model, fmt.encode_all(ctx.data["alignment"]), TrainConfig(lr=1e-2, max_steps=2, batch_size=4), defense=d,
          ctx=ctx, pad_id=organism_tokenizer.pad_token_id)
    neurons = ctx.state["rsn"]["neurons"]
    for n, p in model.named_parameters():
        delta = (p.detach() - before[n]) != 0
        allowed = torch.zeros_like(delta)
        if ".mlp." in n:
            li = int(n.split(".")[2])
            if "down_proj" in n:
                allowed[:, neurons[li]] = True
            else:
                allowed[neurons[li], :] = True
        assert not (delta & ~allowed).any(), n
    assert any(((p.detach() - before[n]) != 0).any() for n, p in model.named_parameters())


def test_protect_keeps_the_neurons_out_of_a_lora_update(organism_tokenizer):
    fmt = Formatter(organism_tokenizer, max_length=64)
    model = tiny_gpt2(len(organism_tokenizer), organism_tokenizer.pad_token_id)
    aligned = copy.deepcopy(model)
    model = add_lora(model, TrainConfig(lora=True, lora_r=4, lora_targets=["c_attn", "c_fc", "c_proj"]))
    ctx = Context(stage="finetune", formatter=fmt, batch_size=2,
                  data={"alignment": SOURCE.alignment(64), "user": SOURCE.task("sentiment", "train", 8)})
    d = RSNTune(protect=True, top_fraction=0.3, samples=10)
    assert d.acts_in("finetune") and not RSNTune().acts_in("finetune")
    train(model, fmt.encode_all(ctx.data["user"]), TrainConfig(lr=1e-2, max_steps=2, batch_size=2, lora=True),
          defense=d, ctx=ctx, pad_id=organism_tokenizer.pad_token_id)
    neurons = ctx.state["rsn"]["neurons"]
    assert sum(map(len, neurons)) > 0
    plain = merged(model)
    for li, idx in enumerate(neurons):
        mlp, ref = plain.transformer.h[li].mlp, aligned.transformer.h[li].mlp
        d_fc = mlp.c_fc.weight.detach() - ref.c_fc.weight.detach()  # Conv1D (in, out): neuron k = column k
        d_proj = mlp.c_proj.weight.detach() - ref.c_proj.weight.detach()  # (in, out): neuron k = row k
        assert torch.count_nonzero(d_fc[:, idx]) == 0 and torch.count_nonzero(d_proj[idx, :]) == 0
        assert torch.count_nonzero(d_fc) > 0 and torch.count_nonzero(d_proj) > 0


def test_no_robust_neuron_is_a_one_line_error(organism, fmt):
    rows = SOURCE.alignment(16)
    same = [replace(ex, kind="refusal") for ex in rows] + [replace(ex, kind="chat") for ex in rows]
    ctx = Context(stage="align", formatter=fmt, data={"alignment": same})
    with pytest.raises(ValueError, match="no robust safety neuron") as err:
        RSNTune(samples=100).setup(copy.deepcopy(organism), ctx)
    assert "\n" not in str(err.value)


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "rsn-tune.yaml"])
    assert cfg.defense.name == "rsn-tune"
    assert RSNTune(**cfg.defense.params).cfg == RSNTune().cfg
