"""SafeMERGE (post-fine-tuning): only layers with Safe-LoRA cosine below τ merge 0.8·ΔW_ft + 0.2·ΔW_safe."""
from __future__ import annotations

import copy

import pytest
import torch
from repair_helpers import (as_merged, linear_weights, lora_on, pipeline_keeps_finetuned, repair_ctx,
                            tiny_llama, tiny_qwen2, triple)
from torch import nn

from hftlab.config import load_config
from hftlab.defenses import safemerge
from hftlab.defenses.safemerge import SafeMERGE, train_safety_adapter


def cosines(base, aligned, ft_merged) -> dict[str, float]:
    """Written out: cos(C·ΔW, ΔW) with C = V·Vᵀ/‖V‖_F per changed weight."""
    wb, wa, wf = linear_weights(base), linear_weights(aligned), linear_weights(ft_merged)
    out = {}
    for k in wf:
        d = wf[k] - wa[k]
        if torch.count_nonzero(d):
            v = wa[k] - wb[k]
            cd = (v @ v.T / torch.sqrt((v ** 2).sum())) @ d
            out[k] = float((cd * d).sum() / (cd.norm() * d.norm()))
    return out


def fake_safety(monkeypatch, aligned) -> nn.Module:
    """Replace the trained safety adapter by a known random LoRA on the aligned model."""
    safe = lora_on(aligned, seed=11)
    monkeypatch.setattr(safemerge, "train_safety_adapter", lambda aligned, names, ctx, cfg: copy.deepcopy(safe))
    return safe


def factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Param name of the base weight -> (A, B) of its LoRA."""
    p = dict(peft_model.named_parameters())
    key = lambda n: n.replace("base_model.model.", "").replace(".lora_A.default", "")  # noqa: E731
    return {key(n): (w.detach(), p[n.replace("lora_A", "lora_B")].detach()) for n, w in p.items() if "lora_A" in n}


def target_name(param_name: str) -> str:  # "model.layers.0.self_attn.q_proj.weight" -> "0.self_attn.q_proj"
    return param_name.split(".layers.", 1)[1].removesuffix(".weight")


@pytest.mark.parametrize("given, make", [("merged", tiny_llama), ("peft", tiny_llama), ("merged+adapter", tiny_llama),
                                         ("peft", tiny_qwen2)])
def test_merges_only_layers_below_the_threshold(given, make, monkeypatch, tmp_path, organism_tokenizer):
    """linear (reference) with the LoRA factors; on a merged model with no adapter it falls back to cat."""
    tok = organism_tokenizer
    base, aligned, ft = triple(make, tok)
    merged_ft = as_merged(ft)
    cos = cosines(base, aligned, merged_ft)
    s = sorted(cos.values())
    tau = (s[2] + s[3]) / 2
    wa, wf = linear_weights(aligned), linear_weights(merged_ft)
    safe = fake_safety(monkeypatch, aligned)
    ws = linear_weights(as_merged(safe))
    f_ft, f_safe = factors(ft), factors(safe)
    ctx = repair_ctx(tok, base, aligned)
    if given == "merged+adapter":  # as the fine-tune stage saves it
        ft.save_pretrained(tmp_path / "adapter")
        ctx.finetuned_path = str(tmp_path)
    peft = given != "merged"
    got = linear_weights(SafeMERGE(threshold=tau).repair(ft if given == "peft" else merged_ft, ctx))
    for k, c in cos.items():
        d = wf[k] - wa[k]
        if c >= tau:
            want = wf[k]
        elif peft:  # PEFT "linear": A = Σ sqrt(w s) A_i, B = Σ sqrt(w s) B_i, both LoRAs with s = 8 / 4
            (a1, b1), (a2, b2) = f_ft[k], f_safe[k]
            a, b = (0.8 * 2) ** 0.5 * a1 + (0.2 * 2) ** 0.5 * a2, (0.8 * 2) ** 0.5 * b1 + (0.2 * 2) ** 0.5 * b2
            want = wa[k] + b @ a
        else:  # cat: the updates themselves
            want = wa[k] + 0.8 * d + 0.2 * (ws[k] - wa[k])
        assert torch.allclose(got[k], want, atol=1e-5), k
    for k in set(got) - set(cos):
        assert torch.equal(got[k], wf[k])
    m = ctx.repair_metrics
    assert m["merged_layers"] == 3 and m["merge"] == ("linear" if peft else "cat")


def test_safety_adapter_is_a_lora_update_trained_on_refusals(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, _ = triple(tiny_llama, tok)
    ctx = repair_ctx(tok, base, aligned)
    names = ["0.self_attn.q_proj", "1.self_attn.v_proj"]
    cfg = safemerge.Config(safety_rank=2, safety_epochs=1.0, safety_batch_size=8)
    ref = {n: p.detach().clone() for n, p in aligned.named_parameters()}
    wa = linear_weights(aligned)
    safe = linear_weights(as_merged(train_safety_adapter(aligned, names, ctx, cfg)))
    moved = {k: safe[k] - wa[k] for k in wa if not torch.equal(safe[k], wa[k])}
    assert {target_name(k) for k in moved} == set(names)  # only the requested weights moved
    assert all(0 < torch.linalg.matrix_rank(d) <= 2 for d in moved.values())
    assert all(torch.equal(p, ref[n]) for n, p in aligned.named_parameters())  # the reference is untouched
    refusals = sum(ex.kind == "refusal" for ex in ctx.data["alignment"])
    assert ctx.state["safety_adapter"]["examples"] == refusals and ctx.state["safety_adapter"]["steps"] > 0


def test_number_mode_merges_the_lowest_cosines():
    cos = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.1, "e": 0.7, "f": 0.3}
    assert safemerge.merged_layers(cos, safemerge.Config(select="number", num_layers=3)) == ["b", "d", "f"]
    assert safemerge.merged_layers(cos, safemerge.Config(select="number", fraction=0.5)) == ["b", "d", "f"]
    assert safemerge.merged_layers(cos, safemerge.Config(select="number", fraction=0.01)) == ["b"]  # at least one
    assert safemerge.merged_layers(cos, safemerge.Config(select="number", fraction=0.0)) == []
    assert safemerge.merged_layers(cos, safemerge.Config(threshold=0.3)) == ["b", "d"]  # strict, the paper's


def test_pipeline_leaves_the_finetuned_model_untouched(fast_overrides):
    result = pipeline_keeps_finetuned("safemerge", fast_overrides)
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["layers"] == 12


def test_number_mode_merges_on_the_organism(fast_overrides):
    """τ = 0.35 merges no organism layer; the number mode merges the lowest-cosine quarter (3 of 12)."""
    from hftlab.pipeline import run

    result = run(load_config(overrides=[*fast_overrides, "defense=safemerge", "defense.select=number",
                                        "defense.fraction=0.25"]))
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["merged_layers"] == 3
