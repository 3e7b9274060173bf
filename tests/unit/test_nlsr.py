"""NLSR (post-fine-tuning): EXPO reference, low-rank safety-critical neurons, per-layer similarity and the
transplant, against a direct computation (SVD of the score matrix, float64)."""
from __future__ import annotations

import copy

import pytest
import torch
from finetune_helpers import perturbed
from repair_helpers import (as_merged, bad_param, pipeline_keeps_finetuned, repair_ctx, tiny_gpt2,
                            tiny_llama, triple, weights64)
from torch import nn

from hftlab.defenses.nlsr import NLSR, restore_probabilities

QKV = ("q_proj", "k_proj", "v_proj")


def expo_model(aligned: nn.Module, base: nn.Module, alpha: float) -> nn.Module:
    ref = copy.deepcopy(aligned)
    sa, sb = aligned.state_dict(), base.state_dict()
    ref.load_state_dict({k: sa[k] + alpha * (sa[k] - sb[k]) for k in sa})
    return ref


def answer_inputs(model: nn.Module, ctx, modules: dict[str, nn.Module], n: int) -> dict[str, torch.Tensor]:
    """Each module's inputs at the answer tokens of the first n refusals, one sequence at a time."""
    xs: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    keep: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, k=k: xs[k].append(inp[0].detach()[0][keep["m"]]))
             for k, m in modules.items()]
    with torch.no_grad():
        for ex in [ex for ex in ctx.data["alignment"] if ex.kind == "refusal"][:n]:
            enc = ctx.formatter.encode(ex)
            keep["m"] = torch.tensor(enc["labels"]) != -100
            model(input_ids=torch.tensor([enc["input_ids"]]))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


def direct_mask(d_ref: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    score = x @ d_ref.T
    _, _, vh = torch.linalg.svd(score, full_matrices=False)
    v = vh[: int(min(d_ref.shape) * sparsity)].T
    proj = (v @ v.T @ d_ref).abs()
    return proj > proj.flatten().sort().values[int(proj.numel() * sparsity)]


def expected(tok, base, aligned, ft_model, ctx, suffixes, alpha=0.9, sparsity=0.8, n=2000):
    """name -> (mask, similarity, fine-tuned weight, reference weight) by the direct computation."""
    ref = expo_model(aligned, base, alpha)
    mods = {k: m for k, m in ref.named_modules() if k.endswith(suffixes)}
    xs = answer_inputs(ref, ctx, mods, n)
    wa, wr, wf = weights64(aligned), weights64(ref), weights64(ft_model)
    out = {}
    for name, x in xs.items():
        k = f"{name}.weight"
        if torch.equal(wf[k], wa[k]):
            continue
        d_ref = wr[k] - wa[k]
        mask = direct_mask(d_ref, x, sparsity)
        a, b = ((wf[k] - wa[k]) * mask).flatten(), (d_ref * mask).flatten()
        out[k] = (mask, float(a @ b / (a.norm() * b.norm())), wf[k], wr[k])
    return out


def close(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), key


def direct_probabilities(sims: list[float], rate: float, eps: float) -> list[float]:
    order = sorted(range(len(sims)), key=lambda i: sims[i])  # least similar first
    n = len(sims)
    u = {i: 1 - r / (n - 1) for r, i in enumerate(order)}
    return [min(1.0, max(0.0, rate - eps + 2 * eps * u[i])) for i in range(n)]


@pytest.mark.parametrize("peft", [False, True])
def test_every_layer_restored_matches_the_direct_computation(peft, organism_tokenizer):
    """prune_rate 1, ε 0: every layer restored, W = W_ft on the non-critical neurons, W_ref on the critical."""
    tok = organism_tokenizer
    base, aligned, ft = (m.double() for m in triple(tiny_llama, tok))
    ctx = repair_ctx(tok, base, aligned)
    want = expected(tok, base, aligned, as_merged(ft), ctx, QKV)
    got = weights64(NLSR(prune_rate=1.0, epsilon=0.0).repair(ft if peft else as_merged(ft), ctx))
    assert len(want) == 6 and ctx.repair_metrics["restored_layers"] == 6
    for k, (mask, _, wf, wr) in want.items():
        assert 0.15 < float(mask.double().mean()) <= 0.2, k  # the top 20% (ties at the threshold excluded)
        close(got[k], torch.where(mask, wr, wf), k)
    sims = [s for _, s, _, _ in want.values()]
    assert ctx.repair_metrics["min_sim"] == pytest.approx(min(sims), abs=1e-9)
    assert ctx.repair_metrics["mean_sim"] == pytest.approx(sum(sims) / len(sims), abs=1e-9)


def test_adaptive_selection_restores_the_drawn_layers(organism_tokenizer):
    """Default p: the Bernoulli draw of the run seed over the direct probabilities picks the restored layers."""
    tok = organism_tokenizer
    base, aligned, ft = (m.double() for m in triple(tiny_llama, tok))
    ctx = repair_ctx(tok, base, aligned, seed=3)
    want = expected(tok, base, aligned, as_merged(ft), ctx, QKV)
    got = weights64(NLSR().repair(as_merged(ft), ctx))
    probs = direct_probabilities([s for _, s, _, _ in want.values()], 0.5, 0.2)
    draw = torch.bernoulli(torch.tensor(probs, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    restored = []
    for (k, (mask, _, wf, wr)), hit in zip(want.items(), draw.tolist()):
        close(got[k], torch.where(mask, wr, wf) if hit else wf, k)
        if hit:
            restored.append(k.removeprefix("model.layers.").removesuffix(".weight"))
    assert ctx.repair_metrics["restored"] == restored


def test_probabilities_follow_the_similarity_ranking():
    sims = [0.3, -0.2, 0.9, 0.1, 0.5]
    got = restore_probabilities(sims, 0.5, 0.2).tolist()
    assert got == pytest.approx(direct_probabilities(sims, 0.5, 0.2))
    assert got[1] == pytest.approx(0.7) and got[2] == pytest.approx(0.3)  # least similar: most likely restored
    assert restore_probabilities([0.4], 0.5, 0.2).tolist() == pytest.approx([0.5])
    assert restore_probabilities(sims, 0.9, 0.2).max() == 1.0  # clipped


def test_full_finetuning_and_second_architecture_gpt2(organism_tokenizer):
    tok = organism_tokenizer
    base = tiny_gpt2(len(tok), tok.pad_token_id).double()
    aligned = perturbed(base, 0.05, seed=1)
    ft = perturbed(aligned, 0.02, seed=3)  # full fine-tuning: every weight changed
    ctx = repair_ctx(tok, base, aligned)
    want = expected(tok, base, aligned, ft, ctx, ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    out = NLSR(prune_rate=1.0, epsilon=0.0).repair(copy.deepcopy(ft), ctx)
    got = weights64(out)
    assert len(want) == 8
    for k, (mask, _, wf, wr) in want.items():
        close(got[k], torch.where(mask, wr, wf), k)
    fp = dict(ft.named_parameters())
    for name, p in out.named_parameters():  # outside the linear weights the fine-tuned model is kept
        if p.dim() == 1 or "wte" in name or "wpe" in name:
            assert torch.equal(p, fp[name]), name


@pytest.mark.parametrize("key, value", [("alpha", "-1"), ("sparsity", "1.5"), ("epsilon", "0.6"),
                                        ("prune_rate", "x"), ("calib_n", "0")])
def test_bad_parameters_are_one_line_errors(key, value):
    bad_param("nlsr", key, value)


def test_pipeline_leaves_the_finetuned_model_untouched(fast_overrides):
    result = pipeline_keeps_finetuned("nlsr", fast_overrides)
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["layers"] > 0 and 0 < repair["metrics"]["mask_fraction"] <= 0.2
