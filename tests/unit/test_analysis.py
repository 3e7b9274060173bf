"""The analyses' quantities against direct computations on tiny float64 models built here (``hftlab analyze``).

Each direct computation is written independently of :mod:`hftlab.analysis` (one example at a time, no
padding, HF's own outputs or plain linear algebra), so the tests compare two implementations.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hftlab.analysis import basin, drift, gradients, refusal, shallow, weights
from hftlab.analysis.common import capture_residual, mean_ci, pearson, spearman
from hftlab.analysis.dynamics import mean_loss
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source

SOURCE = get_source("organism")


def tiny_llama(vocab: int, pad: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=pad, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def fmt(organism_tokenizer) -> Formatter:
    return Formatter(organism_tokenizer, "auto", 128)


@pytest.fixture(scope="module")
def pair(organism_tokenizer):
    """Two different tiny models with the organism's vocabulary."""
    v, pad = len(organism_tokenizer), organism_tokenizer.pad_token_id
    return tiny_llama(v, pad, 0), tiny_llama(v, pad, 1)


def harmful(n: int):
    return SOURCE.harmful("eval", n)


def test_drift_of_identical_models_is_zero_and_of_an_embedding_shift_its_norm(fmt, pair):
    a = pair[0]
    same = drift.embedding_drift(a, copy.deepcopy(a), fmt, harmful(6), batch_size=4)
    assert max(same["all_tokens"] + same["last_token"]) == 0.0
    shifted = copy.deepcopy(a)
    v = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        shifted.get_input_embeddings().weight += v  # every token's embedding moves by v
    d = drift.embedding_drift(shifted, a, fmt, harmful(6), batch_size=4)
    assert d["all_tokens"][0] == pytest.approx(float(v.norm()), rel=1e-9)
    assert d["last_token"][0] == pytest.approx(float(v.norm()), rel=1e-9)
    assert len(d["all_tokens"]) == 3 and d["all_tokens"][1] > 0  # embeddings + 2 layers; the shift propagates


def test_per_position_kl_matches_a_direct_computation(fmt, pair):
    p, q = pair
    data = harmful(5)
    got = shallow.per_position_kl(p, q, fmt, data, max_positions=12, batch_size=2)
    sums, counts = [0.0] * 12, [0] * 12
    for ex in data:  # one example at a time, unpadded
        f = fmt.encode(ex)
        ids = torch.tensor([f["input_ids"]])
        start = sum(1 for x in f["labels"] if x == -100)  # first answer token's index
        with torch.no_grad():
            lp = torch.log_softmax(p(input_ids=ids).logits[0], -1)
            lq = torch.log_softmax(q(input_ids=ids).logits[0], -1)
        for t in range(min(12, len(f["input_ids"]) - start)):
            pos = start + t - 1  # the logits that predict answer token t
            sums[t] += float(F.kl_div(lq[pos], lp[pos], log_target=True, reduction="sum"))
            counts[t] += 1
    want = [s / c for s, c in zip(sums, counts) if c]
    assert got["count"] == [c for c in counts if c]
    assert got["kl"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert drift_free(shallow.per_position_kl(p, copy.deepcopy(p), fmt, data, 12, 2)["kl"])


def drift_free(values):
    return max(abs(v) for v in values) < 1e-12


def test_difference_in_means_matches_hf_hidden_states_per_prompt(fmt, pair):
    model = pair[0]
    harm, harmless = harmful(4), [ex for ex in SOURCE.alignment(64) if ex.kind == "chat"][:5]
    got = refusal.difference_in_means(model, fmt, harm, harmless, batch_size=3)  # left-padded batches

    def mean_last(examples):
        rows = []
        for ex in examples:
            ids = torch.tensor([fmt.prompt_ids(ex.prompt)])
            with torch.no_grad():
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1] for h in hs[:2]]))  # inputs of layers 0 and 1
        return torch.stack(rows).mean(0)

    want = mean_last(harm) - mean_last(harmless)
    assert torch.allclose(got[:2], want, rtol=1e-8, atol=1e-10)
    assert got.shape == (3, 32)


def test_ablation_removes_the_direction_everywhere_and_addition_shifts_the_layer_input(fmt, pair):
    model = pair[0]
    batch = fmt.generation_batch([ex.prompt for ex in harmful(3)])
    u = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with refusal.ablated(model, u), capture_residual(model) as store, torch.no_grad():
        model(**batch)
        assert all(float((h @ F.normalize(u, dim=0)).abs().max()) < 1e-10 for h in store)
    with capture_residual(model) as store, torch.no_grad():
        model(**batch)
        plain = [h.clone() for h in store]
    with refusal.added(model, u, 0), capture_residual(model) as store, torch.no_grad():
        model(**batch)
        assert torch.allclose(store[0], plain[0] + u)
        assert not torch.allclose(store[1], plain[1])


def test_gradient_cosine_matches_direct_torch(fmt, pair):
    model = copy.deepcopy(pair[0]).requires_grad_(True)
    a, b = harmful(5), [ex for ex in SOURCE.alignment(64) if ex.kind == "refusal"][:4]
    ga = gradients.set_gradient(model, fmt, a, batch_size=2)  # three batches, summed

    def direct(examples):
        batch = fmt.collate(fmt.encode_all(examples))
        loss = model(**batch).loss  # HF's mean over every labelled token of one padded batch
        names = [n for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
        return dict(zip(names, grads))

    da, db = direct(a), direct(b)
    for n in da:
        assert torch.allclose(ga[n].double(), da[n], rtol=1e-5, atol=1e-7 * float(da[n].abs().max()))
    gb = gradients.set_gradient(model, fmt, b, batch_size=3)
    flat = lambda g: torch.cat([g[n].double().flatten() for n in da])  # noqa: E731
    want = float(F.cosine_similarity(flat(da), flat(db), dim=0))
    assert gradients.cosine(ga, gb) == pytest.approx(want, rel=1e-5)
    assert gradients.cosine(ga, ga) == pytest.approx(1.0, rel=1e-9)


def test_weight_drift_norms_and_principal_angles(pair):
    base, aligned = pair
    final = copy.deepcopy(aligned)
    delta = torch.zeros_like(final.model.layers[1].mlp.up_proj.weight)
    delta[:3, :5] = 0.25
    with torch.no_grad():
        final.model.layers[1].mlp.up_proj.weight += delta
    res = weights.weight_drift(final, aligned, base, rank=2)
    by_name = {r["name"]: r for r in res["targets"]}
    assert by_name["1.mlp.up_proj"]["drift"] == pytest.approx(float(delta.norm()), rel=1e-6)
    assert all(r["drift"] == 0 for n, r in by_name.items() if n != "1.mlp.up_proj")
    assert res["per_layer"] == pytest.approx([0.0, float(delta.norm())], rel=1e-6)
    assert res["total"] == pytest.approx(float(delta.norm()), rel=1e-6)
    w_al, w_base = aligned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    want_align = float((w_al - w_base).detach().norm())
    assert by_name["0.self_attn.q_proj"]["alignment_drift"] == pytest.approx(want_align, rel=1e-6)


def test_principal_angles_of_known_subspaces():
    t = 0.3
    e = torch.eye(5, dtype=torch.float64)
    a = torch.stack([e[0], e[1]], 1)
    b = torch.stack([2 * e[0], math.cos(t) * e[1] + math.sin(t) * e[2]], 1)  # scale does not matter
    assert weights.principal_angles(a, b).tolist() == pytest.approx([0.0, t], abs=1e-7)
    c = torch.stack([e[3], e[4]], 1)
    assert weights.principal_angles(a, c).tolist() == pytest.approx([math.pi / 2] * 2, abs=1e-7)


def test_basin_direction_perturbation_and_width(pair):
    model = copy.deepcopy(pair[0])
    d = basin.random_direction(model, seed=0)
    params = dict(model.named_parameters())
    assert set(d) == {n for n, p in params.items() if p.dim() >= 2}
    assert all(float(d[n].norm()) == pytest.approx(float(params[n].detach().norm()), rel=1e-5) for n in d)
    before = {n: p.detach().clone() for n, p in params.items()}
    with basin.perturbed(model, [(0.5, d)]):
        n0 = next(iter(d))
        assert torch.allclose(params[n0], before[n0] + 0.5 * d[n0].double())
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    w = basin.basin_width([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3], [90, 40, 12, 10, 15, 21, 60], tolerance=10)
    assert (w["left"], w["right"], w["width"], w["censored"]) == (-0.1, 0.1, pytest.approx(0.2), False)
    assert basin.basin_width([-0.1, 0.0, 0.1], [0, 0, 0])["censored"]


def test_probe_loss_and_statistics(fmt, pair):
    feats = fmt.encode_all(harmful(4))
    batch = fmt.collate(feats)
    with torch.no_grad():
        want = float(pair[0](**batch).loss)
    # HF computes its loss in float32; ours keeps the model's float64
    assert mean_loss(pair[0], feats, fmt.collate, batch_size=3) == pytest.approx(want, rel=1e-6)
    s = mean_ci([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"]) == (2.0, 1.0) and s["ci95"] == pytest.approx(4.30 / 3 ** 0.5)
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


def test_analyze_command_on_a_fast_run(fast_overrides, tmp_path):
    """End to end through the CLI: the run is computed, the replayed fine-tuning retraces its losses, and
    LoRA on q, k, v leaves the embeddings (layer 0) without drift."""
    from hftlab.cli import main

    out = tmp_path / "report"
    assert main(["analyze", *fast_overrides, "--only", "drift,weights,dynamics", "--quick", "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    folder = index["runs"][0]["folder"]
    d = json.loads((tmp_path / "report" / folder.split("/")[-1] / "drift.json").read_text())["result"]
    assert d["finetuned_vs_aligned"]["all_tokens"][0] == 0.0 and d["finetuned_vs_aligned"]["all_tokens"][-1] > 0
    dyn = json.loads((out / folder.split("/")[-1] / "dynamics.json").read_text())["result"]
    assert dyn["replay_max_abs_diff"] is not None and dyn["replay_max_abs_diff"] < 1e-5
    for png in ("drift_layers.png", "weight_drift.png", "dynamics.png"):
        assert (out / folder.split("/")[-1] / png).stat().st_size > 10_000
    assert main(["analyze", "--only", "nonsense", "--run", str(tmp_path / "missing")]) == 2
