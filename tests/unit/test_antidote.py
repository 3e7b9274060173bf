"""Antidote (post-fine-tuning): Wanda score from activations on the harmful set, row-wise top-k zeroing."""
from __future__ import annotations

import copy

import torch
from finetune_helpers import perturbed
from repair_helpers import (as_merged, linear_weights, pipeline_keeps_finetuned, repair_ctx,
                            tiny_gpt2, tiny_llama, triple)
from torch import nn

from hftlab.defenses.antidote import Antidote, wanda_mask


def topk_zeroed(w: torch.Tensor, score: torch.Tensor, dense: float) -> torch.Tensor:
    """w with, per row, every entry but the int(cols·(1 − dense)) lowest scores set to zero."""
    n_zero = w.shape[1] - int(w.shape[1] * (1 - dense))
    out = w.clone()
    for i in range(w.shape[0]):
        out[i, torch.topk(score[i], n_zero).indices] = 0
    return out


def harmful_inputs(model: nn.Module, ctx, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of each module's input over every real token of the harmful set, one sample at a time."""
    sums: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: sums.__setitem__(
        n, sums.get(n, 0) + (inp[0].detach().float()[0] ** 2).sum(0))) for n, m in modules.items()]
    with torch.no_grad():
        for ex in ctx.data["harmful"]:
            ids = ctx.formatter.encode(ex, train_on_prompt=True)["input_ids"]
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


def test_wanda_mask_zeroes_the_top_fraction_of_each_row():
    g = torch.Generator().manual_seed(0)
    w, sq = torch.randn(5, 20, generator=g), torch.rand(20, generator=g)
    mask = wanda_mask(w, sq, 0.1)
    score = w.abs() * sq.sqrt()
    assert torch.equal(w * (1 - mask), topk_zeroed(w, score, 0.1))
    assert (mask.sum(1) == 2).all()  # 20 - int(20 * 0.9)


def test_merged_model_prunes_the_update(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    model = as_merged(ft)
    ctx = repair_ctx(tok, base, aligned)
    layers = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))}
    norms = harmful_inputs(model, ctx, layers)
    wa, wf = linear_weights(aligned), linear_weights(model)
    want = {}
    for name in layers:
        k = f"{name}.weight"
        delta = wf[k] - wa[k]
        want[k] = wa[k] + topk_zeroed(delta, delta.abs() * norms[name].unsqueeze(0), 0.1)
    got = linear_weights(Antidote().repair(model, ctx))
    for k, w in want.items():
        assert torch.allclose(got[k], w, atol=1e-6), k
    for k in set(got) - set(want):  # weights fine-tuning did not change stay as they were
        assert torch.equal(got[k], wa[k]), k
    assert ctx.repair_metrics["mode"] == "update" and ctx.repair_metrics["matrices"] == 6


def test_peft_model_prunes_the_lora_factors(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    ctx = repair_ctx(tok, base, aligned)
    factors = {n: m for n, m in ft.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))}
    norms = harmful_inputs(ft, ctx, factors)
    want = {n: topk_zeroed(m.weight.detach(), m.weight.detach().abs() * norms[n].unsqueeze(0), 0.1)
            for n, m in factors.items()}
    out = Antidote().repair(ft, ctx)
    for n, m in factors.items():  # the adapter was pruned in place, then merged into the output
        assert torch.allclose(m.weight, want[n], atol=1e-7), n
        assert (m.weight == 0).sum(1).min() >= 1
    wa, got = linear_weights(aligned), linear_weights(out)
    lora = {n.removesuffix(".lora_A.default"): (m, factors[n.replace("lora_A", "lora_B")])
            for n, m in factors.items() if "lora_A" in n}
    for name, (a, b) in lora.items():  # W = W_aligned + s·B'·A' with the pruned factors (s = 8 / 4)
        k = name.replace("base_model.model.", "") + ".weight"
        assert torch.allclose(got[k], wa[k] + 2.0 * b.weight.detach() @ a.weight.detach(), atol=1e-6), k
    assert ctx.repair_metrics["mode"] == "adapter" and ctx.repair_metrics["matrices"] == 12


def test_merged_model_uses_the_saved_adapter(tmp_path, organism_tokenizer):
    """The fine-tune stage saves the adapter next to the merged model: Antidote prunes its factors."""
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    model = as_merged(ft)
    ft.save_pretrained(tmp_path / "adapter")
    want = linear_weights(Antidote().repair(copy.deepcopy(ft), repair_ctx(tok, base, aligned)))
    ctx = repair_ctx(tok, base, aligned)
    ctx.finetuned_path = str(tmp_path)
    got = linear_weights(Antidote().repair(model, ctx))
    assert ctx.repair_metrics["mode"] == "adapter"
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    ctx = repair_ctx(tok, base, perturbed(aligned, 0.01, seed=5))  # an adapter that does not reproduce the model
    ctx.finetuned_path = str(tmp_path)
    Antidote().repair(as_merged(ft), ctx)
    assert ctx.repair_metrics["mode"] == "update"
    ctx = repair_ctx(tok, base, aligned)
    Antidote(weights="update").repair(copy.deepcopy(ft), ctx)
    assert ctx.repair_metrics["mode"] == "update"


def test_second_architecture_gpt2(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_gpt2, tok, targets=["c_attn"])
    model = as_merged(ft)
    ctx = repair_ctx(tok, base, aligned)
    layers = {n: m for n, m in model.named_modules() if n.endswith("attn.c_attn")}
    norms = harmful_inputs(model, ctx, layers)
    wa, wf = linear_weights(aligned), linear_weights(model)
    got = linear_weights(Antidote(dense_ratio=0.2).repair(model, ctx))
    for name in layers:
        k = f"{name}.weight"
        delta = wf[k] - wa[k]
        want = wa[k] + topk_zeroed(delta, delta.abs() * norms[name].unsqueeze(0), 0.2)
        assert torch.allclose(got[k], want, atol=1e-6), k


def test_pipeline_leaves_the_finetuned_model_untouched(fast_overrides):
    result = pipeline_keeps_finetuned("antidote", fast_overrides)
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["mode"] == "adapter" and repair["metrics"]["pruned"] > 0  # the saved adapter
