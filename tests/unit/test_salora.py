"""SaLoRA: the safety module C = I − V_s·V_sᵀ and the task-specific start (B₀, A₀) against a direct
computation (features from the test's own hooks, subspaces by eigendecomposition), the gradient of the
adapter through W + s·C·(B·A − B₀·A₀) written with ``functional_call``, and the merged update after
training (V_sᵀ·ΔW = 0)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from align_helpers import assert_grads_close, grads, loss_of, organism  # noqa: F401
from finetune_helpers import SOURCE, make_ctx, second_arch_run, user_batch, user_data
from torch.func import functional_call

from hftlab.config import TrainConfig, load_config
from hftlab.data.format import IGNORE, Formatter
from hftlab.defenses.salora import RESIDUAL, SaLoRA
from hftlab.models.loading import add_lora, merged

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"
PROJ = ("q_proj", "k_proj", "v_proj")
RS, RT, R = 3, 5, 4


@pytest.fixture()
def fmt(organism_tokenizer):
    return Formatter(organism_tokenizer, max_length=96)


def _inputs(model, rows, fmt):
    """{(layer, proj): inputs at the labelled tokens} by the test's own hooks, one example at a time."""
    got: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for p in PROJ:
            def keep(_m, args, key=(i, p)):
                got.setdefault(key, []).append(args[0][0][cur["mask"]])
            hooks.append(getattr(layer.self_attn, p).register_forward_pre_hook(keep))
    cur: dict = {}
    with torch.no_grad():
        for f in fmt.encode_all(rows):
            ids = torch.tensor([f["input_ids"]])
            cur["mask"] = torch.tensor(f["labels"]) != IGNORE
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def _top_projector(f, k):
    """Projector on the top-k right singular subspace of f, from the eigenvectors of fᵀ·f."""
    vals, vecs = torch.linalg.eigh(f.T @ f)
    v = vecs[:, torch.argsort(vals, descending=True)[:k]]
    return v @ v.T


def _layer(model, i, p):
    return getattr(model.base_model.model.model.layers[i].self_attn, p)


def _setup(organism, fmt):
    model = add_lora(copy.deepcopy(organism), TrainConfig(lora=True, lora_r=R))
    ctx = make_ctx(fmt, aligned=organism, data={"alignment": SOURCE.alignment(32), "user": user_data()[:16]})
    d = SaLoRA(safety_rank=RS, task_rank=RT, samples=10_000)  # every row: SVD subspaces ignore row order
    d.setup(model, ctx)
    return model, ctx, d


def test_safety_module_and_initialisation(organism, fmt):
    model, ctx, _ = _setup(organism, fmt)
    safe = _inputs(organism, [ex for ex in ctx.data["alignment"] if ex.kind == "refusal"], fmt)
    task = _inputs(organism, ctx.data["user"], fmt)
    for (i, p), xs in safe.items():
        w = getattr(organism.model.layers[i].self_attn, p).weight.detach()
        lay = _layer(model, i, p)
        s = lay.scaling["default"]
        c = torch.eye(w.shape[0], dtype=w.dtype) - _top_projector(xs @ w.T, RS)
        u, sv, vh = torch.linalg.svd(w)
        want_ba = _top_projector(task[(i, p)] @ w.T, RT) @ u[:, :R] @ torch.diag(sv[:R]) @ vh[:R] / s
        b0, a0 = lay.lora_B["default"].weight, lay.lora_A["default"].weight
        torch.testing.assert_close(b0 @ a0, want_ba, rtol=0, atol=1e-9 * float(want_ba.abs().max()))
        res = lay.lora_B[RESIDUAL].weight @ lay.lora_A[RESIDUAL].weight
        torch.testing.assert_close(res, -c @ want_ba, rtol=0, atol=1e-9 * float(want_ba.abs().max()))
    b = user_batch(fmt)
    with torch.no_grad():  # the start is the aligned model: s·C·B₀·A₀ − s·C·B₀·A₀ = 0
        torch.testing.assert_close(model(**b).logits, organism(**b).logits, rtol=0, atol=1e-10)


def test_gradient_through_the_safety_module(organism, fmt):
    model, ctx, d = _setup(organism, fmt)
    with torch.no_grad():  # move B, A off the start so that B·A − B₀·A₀ ≠ 0
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    b = user_batch(fmt)
    loss_of(model, b).backward()
    got = grads(model)
    safe = _inputs(organism, [ex for ex in ctx.data["alignment"] if ex.kind == "refusal"], fmt)
    leaves, weights, cs = {}, {}, {}
    for (i, p), xs in safe.items():
        w = getattr(organism.model.layers[i].self_attn, p).weight.detach()
        lay = _layer(model, i, p)
        c = torch.eye(w.shape[0], dtype=w.dtype) - _top_projector(xs @ w.T, RS)
        bb = lay.lora_B["default"].weight.detach().clone().requires_grad_(True)
        aa = lay.lora_A["default"].weight.detach().clone().requires_grad_(True)
        b0a0 = -c @ lay.lora_B[RESIDUAL].weight.detach() @ lay.lora_A[RESIDUAL].weight.detach()  # = C·B₀·A₀
        s = lay.scaling["default"]
        pre = f"base_model.model.model.layers.{i}.self_attn.{p}.lora_"
        leaves[pre + "B.default.weight"], leaves[pre + "A.default.weight"] = bb, aa
        weights[f"model.layers.{i}.self_attn.{p}.weight"] = w + s * (c @ bb @ aa - b0a0)
        cs[(i, p)] = c
    out = functional_call(organism, weights, kwargs={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                                                    "labels": b["labels"]})
    out.loss.backward()
    assert_grads_close(got, {n: t.grad for n, t in leaves.items()})
    # after training, the merged update is s·C·(B·A − B₀·A₀): nothing of it on the safety directions
    d.teardown(model, ctx)
    plain = merged(model)
    for (i, p), c in cs.items():
        delta = getattr(plain.model.layers[i].self_attn, p).weight.detach() - \
            getattr(organism.model.layers[i].self_attn, p).weight.detach()
        w_eff = weights[f"model.layers.{i}.self_attn.{p}.weight"].detach() - \
            getattr(organism.model.layers[i].self_attn, p).weight.detach()
        torch.testing.assert_close(delta, w_eff, rtol=0, atol=1e-10)
        eye = torch.eye(c.shape[0], dtype=c.dtype)
        assert float(((eye - c) @ delta).abs().max()) < 1e-10 * float(delta.abs().max())


def test_full_fine_tuning_is_a_one_line_error(organism, fmt):
    with pytest.raises(ValueError, match="finetune.lora=true") as err:
        SaLoRA().setup(copy.deepcopy(organism), make_ctx(fmt, aligned=organism))
    assert "\n" not in str(err.value)


def test_second_architecture_lora(organism_tokenizer):
    before, model = second_arch_run(SaLoRA(samples=8), organism_tokenizer, lora=True)
    after = dict(model.named_parameters())
    frozen = [n for n in before if "lora_" not in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".default." in n)


def test_paper_defaults_file():
    cfg = load_config([CONFIGS / "salora.yaml"])
    assert cfg.defense.name == "salora"
    assert SaLoRA(**cfg.defense.params).cfg == SaLoRA().cfg
