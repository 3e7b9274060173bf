"""RESTA (post-fine-tuning): w ← w_ft + γ·(w_aligned − w_base), optional DARE on the fine-tuning delta."""
from __future__ import annotations

import pytest
import torch
from repair_helpers import as_merged, pipeline_keeps_finetuned, repair_ctx, tiny_gpt2, tiny_llama, triple

from hftlab.defenses.resta import RESTA


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("peft", [False, True])
def test_adds_gamma_times_the_safety_vector(peft, organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    wb, wa, wf = params(base), params(aligned), params(as_merged(ft))
    ctx = repair_ctx(tok, base, aligned)
    out = RESTA(gamma=0.7).repair(ft if peft else as_merged(ft), ctx)
    got = params(out)
    assert got.keys() == wf.keys()
    for n in wf:
        assert torch.allclose(got[n], wf[n] + 0.7 * (wa[n] - wb[n]), atol=1e-6), n


def test_dare_drops_and_rescales_the_finetuning_delta(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    wb, wa, wf = params(base), params(aligned), params(as_merged(ft))
    got = params(RESTA(gamma=0.5, dare_drop=0.5).repair(as_merged(ft), repair_ctx(tok, base, aligned)))
    kept = dropped = 0
    for n in wf:
        d, new = wf[n] - wa[n], got[n] - 0.5 * (wa[n] - wb[n]) - wa[n]  # the surviving fine-tuning delta
        nz = d != 0
        is_kept = torch.isclose(new[nz], 2 * d[nz], atol=1e-5)
        is_dropped = new[nz].abs() < 1e-5
        assert (is_kept | is_dropped).all(), n
        kept, dropped = kept + int(is_kept.sum()), dropped + int(is_dropped.sum())
    assert 0.45 < dropped / (kept + dropped) < 0.55
    again = params(RESTA(gamma=0.5, dare_drop=0.5).repair(as_merged(ft), repair_ctx(tok, base, aligned)))
    assert all(torch.equal(got[n], again[n]) for n in got)  # seeded by ctx.seed


def test_second_architecture_gpt2(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_gpt2, tok, targets=["c_attn"])
    wb, wa, wf = params(base), params(aligned), params(as_merged(ft))
    got = params(RESTA().repair(ft, repair_ctx(tok, base, aligned)))
    for n in wf:
        assert torch.allclose(got[n], wf[n] + 0.5 * (wa[n] - wb[n]), atol=1e-6), n


def test_pipeline_leaves_the_finetuned_model_untouched(fast_overrides):
    result = pipeline_keeps_finetuned("resta", fast_overrides)
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["safety_vector_norm"] > 0
