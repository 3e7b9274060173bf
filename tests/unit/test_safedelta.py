"""Safe Delta (post-fine-tuning): OBS-style selection of the updates under a safety budget, then compensation,
against a direct computation (explicit inverses of H restricted to the remaining columns, float64)."""
from __future__ import annotations

import pytest
import torch
from finetune_helpers import perturbed
from repair_helpers import (as_merged, bad_param, pipeline_keeps_finetuned, repair_ctx, tiny_gpt2,
                            tiny_llama, triple, weights64)
from torch import nn

from hftlab.defenses.safedelta import SafeDelta


def safety_inputs(model: nn.Module, ctx, modules: dict[str, nn.Module], n: int) -> dict[str, torch.Tensor]:
    """Each module's inputs (tokens × features) over every token of the first n refusals, one at a time."""
    xs: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    hooks = [m.register_forward_hook(lambda _m, inp, _o, k=k: xs[k].append(inp[0].detach()[0]))
             for k, m in modules.items()]
    data = [ex for ex in ctx.data["alignment"] if ex.kind == "refusal"][:n]
    with torch.no_grad():
        for ex in data:
            model(input_ids=torch.tensor([ctx.formatter.encode(ex)["input_ids"]]))
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


def direct(w_al, w_ft, x, n_seq, s, width, block, damp=0.01, exclude=0.15, sub=4):
    """The paper's selection and compensation, column by column, with H_F⁻¹ inverted explicitly."""
    h = 2.0 / n_seq * x.T @ x
    dead = torch.diag(h) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w_al.shape
    hinv = [torch.linalg.inv(h[m:, m:])[0] for m in range(cols)]  # row m of H_F⁻¹, F = {m, ..., cols-1}
    d2 = [float(r[0]) for r in hinv]
    w = w_al.clone()
    kept = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        entries = [(r, c) for r in range(rows) for c in range(i1, i2)]
        order = sorted(range(len(entries)), key=lambda k: 1.0 / d2[entries[k][1]])
        order = order[: len(order) - int(exclude * len(order))]
        budget = s * rows * block / width ** 2 * sum(1.0 / d2[c] for _, c in entries) / len(entries)
        total = 0.0
        for k in order:
            r, c = entries[k]
            total += float((w_ft[r, c] - w[r, c]) ** 2) / d2[c]
            if total > budget:
                break
            kept[r, c] = True
        for j1 in range(i1, i2, sub):
            j2 = min(j1 + sub, i2)
            q = torch.where(kept[:, j1:j2], w_ft[:, j1:j2], w[:, j1:j2])
            err = w[:, j1:j2] - q
            w[:, j1:j2] = q
            for c in range(j1, j2):
                row = hinv[c] / hinv[c][0]  # over columns c.. ; the later ones are c+1..
                w[:, j2:] -= err[:, c - j1: c - j1 + 1] * row[j2 - c:].unsqueeze(0)
    return w, kept


def close(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    tol = 1e-6 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol, key


def check(make, tok, ft_model, aligned, base, s, n, suffixes, fraction=True):
    """Run SafeDelta and the direct computation on every changed linear weight; return kept fractions."""
    ctx = repair_ctx(tok, base, aligned)
    mods = {name: m for name, m in aligned.named_modules() if name.endswith(suffixes)}
    xs = safety_inputs(aligned, ctx, mods, n)
    wa = weights64(aligned)
    wf = weights64(as_merged(ft_model) if hasattr(ft_model, "peft_config") else ft_model)
    width = aligned.config.hidden_size
    out = SafeDelta(s=s, calib_n=n).repair(ft_model, ctx)
    got = weights64(out)
    fracs = []
    for name, x in xs.items():
        k = f"{name}.weight"
        if torch.equal(wa[k], wf[k]):
            assert torch.equal(got[k], wa[k]), k
            continue
        want, kept = direct(wa[k], wf[k], x, n, s, width, width // 2)
        close(got[k], want, k)
        fracs.append(float(kept.float().mean()))
    assert ctx.repair_metrics["matrices"] == len(fracs)
    return out, fracs


@pytest.mark.parametrize("peft", [False, True])
def test_selection_and_compensation_match_the_direct_computation(peft, organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = (m.double() for m in triple(tiny_llama, tok))
    _, fracs = check(tiny_llama, tok, ft if peft else as_merged(ft), aligned, base, 2.0, 12,
                     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert len(fracs) == 6 and 0.1 < sum(fracs) / len(fracs) < 0.85  # a real selection, not all or nothing


def test_full_finetuning_reverts_the_other_parameters(organism_tokenizer):
    """Full fine-tuning: every linear weight by the direct computation; embeddings and norms the aligned ones."""
    tok = organism_tokenizer
    base = tiny_llama(len(tok), tok.pad_token_id).double()
    aligned = perturbed(base, 0.05, seed=1)
    ft = perturbed(aligned, 0.01, seed=3)
    out, fracs = check(tiny_llama, tok, ft, aligned, base, 0.03, 8,
                       ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert len(fracs) == 14 and 0.1 < sum(fracs) / len(fracs) < 0.8
    al = dict(aligned.named_parameters())
    for name, p in out.named_parameters():
        if p.dim() == 1 or "embed" in name:
            assert torch.equal(p, al[name]), name


def test_second_architecture_gpt2(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = (m.double() for m in triple(tiny_gpt2, tok, targets=["c_attn"]))
    _, fracs = check(tiny_gpt2, tok, as_merged(ft), aligned, base, 2.0, 8, ("attn.c_attn",))
    assert len(fracs) == 2


def test_budget_orders_the_kept_fraction(organism_tokenizer):
    tok = organism_tokenizer
    base, aligned, ft = triple(tiny_llama, tok)
    got = []
    for s in (0.0, 1.0, 1e9):
        ctx = repair_ctx(tok, base, aligned)
        SafeDelta(s=s, calib_n=8).repair(as_merged(ft), ctx)
        got.append(ctx.repair_metrics["kept_fraction"])
    assert got[0] == 0 < got[1] < got[2]
    assert got[2] == pytest.approx(1 - 0.15, abs=0.01)  # an unlimited budget keeps all but the excluded


@pytest.mark.parametrize("key, value", [("s", "-1"), ("calib_n", "0"), ("exclude", "1.5"), ("sub_block", "0"),
                                        ("percdamp", "x")])
def test_bad_parameters_are_one_line_errors(key, value):
    bad_param("safedelta", key, value)


def test_pipeline_leaves_the_finetuned_model_untouched(fast_overrides):
    result = pipeline_keeps_finetuned("safedelta", fast_overrides)
    repair = next(s for s in result["stages"] if s["name"] == "repair")
    assert repair["metrics"]["matrices"] > 0 and 0 < repair["metrics"]["kept_fraction"] < 1
