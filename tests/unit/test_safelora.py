"""Safe LoRA (post-fine-tuning): projection, per-layer cosine rule in both modes, PEFT/merged, second architecture."""
from __future__ import annotations

import copy

import pytest
import torch
from repair_helpers import (as_merged, linear_weights, pipeline_keeps_finetuned, repair_ctx, tiny_llama,
                            tiny_qwen2, triple)

from hftlab.defenses.safelora import SafeLoRA, cosine, projection


def c_proj(v: torch.Tensor) -> torch.Tensor:
    return v @ v.T / torch.sqrt((v ** 2).sum())


def direct(base, aligned, ft_merged) -> tuple[dict, dict, dict]:
    """Written out: per changed weight, cos(C·ΔW, ΔW), the projected weight and the unchanged weight."""
    wb, wa, wf = linear_weights(base), linear_weights(aligned), linear_weights(ft_merged)
    cos, proj, keep = {}, {}, {}
    for k in wf:
        d = wf[k] - wa[k]
        if not torch.count_nonzero(d):
            continue
        cd = c_proj(wa[k] - wb[k]) @ d
        cos[k] = float((cd * d).sum() / (cd.norm() * d.norm()))
        proj[k], keep[k] = wa[k] + cd, wf[k]
    return cos, proj, keep


def check(got: dict, proj: dict, keep: dict, projected: set) -> None:
    for k in proj:
        want = proj[k] if k in projected else keep[k]
        assert torch.allclose(got[k], want, atol=1e-5), k


def test_projection_and_cosine_formulas():
    g = torch.Generator().manual_seed(0)
    v, d = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    c = projection(v)
    assert torch.allclose(c, v @ v.T / torch.linalg.norm(v), atol=1e-6)  # Frobenius, not squared
    cd = c @ d
    assert cosine(c, d) == pytest.approx(float((cd * d).sum() / (cd.norm() * d.norm())), abs=1e-5)
    assert projection(torch.zeros(3, 4)).abs().sum() == 0  # V = 0: C = 0, no division by zero


@pytest.mark.parametrize("peft", [False, True])
def test_threshold_mode(peft, organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    merged_ft = as_merged(ft)
    cos, proj, keep = direct(base, aligned, merged_ft)
    s = sorted(cos.values())
    tau = (s[2] + s[3]) / 2  # three layers below, three above
    ctx = repair_ctx(tok, base, aligned)
    out = SafeLoRA(select="threshold", threshold=tau).repair(ft if peft else merged_ft, ctx)
    check(linear_weights(out), proj, keep, {k for k, c in cos.items() if c <= tau})
    m = ctx.repair_metrics
    assert (m["projected_layers"], m["layers"]) == (3, 6)


def test_number_mode_projects_the_n_lowest(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    merged_ft = as_merged(ft)
    cos, proj, keep = direct(base, aligned, merged_ft)
    ctx = repair_ctx(tok, base, aligned)
    got = linear_weights(SafeLoRA(num_proj_layers=2).repair(copy.deepcopy(merged_ft), ctx))
    check(got, proj, keep, set(sorted(cos, key=cos.get)[:2]))
    assert ctx.repair_metrics["projected_layers"] == 2
    ctx = repair_ctx(tok, base, aligned)  # the default scales N: 10/64 of the 6 q/k/v matrices -> 1
    got = linear_weights(SafeLoRA().repair(copy.deepcopy(merged_ft), ctx))
    check(got, proj, keep, {min(cos, key=cos.get)})


def test_second_architecture_qwen2(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_qwen2, tok)
    cos, proj, keep = direct(base, aligned, as_merged(ft))
    ctx = repair_ctx(tok, base, aligned)
    got = linear_weights(SafeLoRA(select="threshold", threshold=0.99).repair(ft, ctx))
    assert ctx.repair_metrics["layers"] == 6  # q, k, v of 2 layers
    check(got, proj, keep, {k for k, c in cos.items() if c <= 0.99})


def test_pipeline_leaves_the_finetuned_model_untouched(fast_overrides):
    result = pipeline_keeps_finetuned("safelora", fast_overrides)
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["layers"] == 12  # the organism's 4 layers x q, k, v
