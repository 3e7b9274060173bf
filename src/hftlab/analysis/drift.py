"""Harmful embedding drift (Vaccine: Huang, Hu, Liu, *Vaccine: Perturbation-aware Alignment for Large
Language Models against Harmful Fine-tuning*, arXiv 2402.01109, §3).

The paper's observation: harmful fine-tuning moves the hidden embeddings of the *alignment* data away
from where alignment put them ("harmful embedding drift"), and the drift grows with the harmful ratio
together with the harmful score. Measured here per layer of the residual stream (index 0: embeddings,
index l: output of decoder layer l, before the final norm) as

    drift_l = mean over alignment harmful prompts x of mean over the prompt's tokens t of
              ‖h_l(x; θ_ft)_t − h_l(x; θ_aligned)_t‖₂

(and the same at the prompt's last token only). The base → aligned drift is reported beside it as a
scale. Across a sweep: drift against p and against HS, with Pearson's and Spearman's correlation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.example import Example
from ..data.format import Formatter
from . import plotting
from .common import Subject, mean_ci, pearson, prompt_batches, residual_stream, spearman

N_PROMPTS = 200


@torch.no_grad()
def embedding_drift(a: nn.Module, b: nn.Module, fmt: Formatter, examples: Sequence[Example],
                    batch_size: int = 64) -> dict[str, list[float]]:
    """Per residual-stream layer: mean token-wise L2 distance between ``a``'s and ``b``'s hidden states
    (``all_tokens``) and at the last prompt token (``last_token``), averaged over prompts."""
    sums_all: list[float] = []
    sums_last: list[float] = []
    n = 0
    for batch in prompt_batches(fmt, examples, batch_size):
        ha, hb = residual_stream(a, batch), residual_stream(b, batch)
        mask = batch["attention_mask"].float()
        per_prompt_tokens = mask.sum(-1)
        for li, (x, y) in enumerate(zip(ha, hb)):
            dist = (x - y).norm(dim=-1)  # (B, T)
            all_tok = ((dist * mask).sum(-1) / per_prompt_tokens).sum().item()
            last = dist[:, -1].sum().item()  # left padding: the last column is every prompt's last token
            if li == len(sums_all):
                sums_all.append(0.0)
                sums_last.append(0.0)
            sums_all[li] += all_tok
            sums_last[li] += last
        n += batch["input_ids"].shape[0]
    return {"all_tokens": [s / n for s in sums_all], "last_token": [s / n for s in sums_last]}


def run(subject: Subject, out: Path, n_prompts: int = N_PROMPTS) -> dict[str, Any]:
    fmt = subject.formatter()
    prompts = subject.alignment_harmful(n_prompts)
    bs = subject.cfg.eval.batch_size
    ft = embedding_drift(subject.model("final"), subject.model("aligned"), fmt, prompts, bs)
    result: dict[str, Any] = {"n_prompts": len(prompts), "finetuned_vs_aligned": ft,
                              "units": "L2 distance between hidden states (model units)"}
    if subject.base != subject.aligned:
        result["base_vs_aligned"] = embedding_drift(subject.model("base"), subject.model("aligned"), fmt, prompts, bs)
    _plot(out / "drift_layers.png", result, subject.name)
    return result


def _plot(path: Path, result: dict[str, Any], name: str) -> None:
    fig, axes = plotting.figure()
    ax = axes[0][0]
    series = {"fine-tuned vs aligned": result["finetuned_vs_aligned"]}
    if "base_vs_aligned" in result:
        series["base vs aligned"] = result["base_vs_aligned"]
    st = plotting.styles(list(series))
    for label, d in series.items():
        layers = list(range(len(d["all_tokens"])))
        ax.plot(layers, d["all_tokens"], label=f"{label}, all prompt tokens", **st[label])
        ax.plot(layers, d["last_token"], label=f"{label}, last prompt token", ls="--", **st[label])
    plotting.finish(ax, f"Harmful embedding drift per layer ({name[:12]})",
                    "residual-stream layer (0 = embeddings)", "mean ‖h_ft − h_aligned‖₂ (model units)")
    plotting.save(fig, path)


def summarise(rows: Sequence[tuple[dict[str, Any], dict[str, Any]]], out: Path) -> dict[str, Any]:
    """Across runs: drift (last layer and mean over layers) against p and HS, and their correlations."""
    pts = []
    for meta, res in rows:
        d = res["finetuned_vs_aligned"]["all_tokens"]
        pts.append({"ratio": meta["ratio"], "seed": meta["seed"], "harmful_score": meta["harmful_score"],
                    "drift_last_layer": d[-1], "drift_mean_layers": sum(d) / len(d), "drift_per_layer": d})
    ratios = sorted({p["ratio"] for p in pts})
    by_ratio = {r: [p for p in pts if p["ratio"] == r] for r in ratios}
    n_layers = len(pts[0]["drift_per_layer"])
    per_layer = {r: [mean_ci([p["drift_per_layer"][li] for p in by_ratio[r]]) for li in range(n_layers)]
                 for r in ratios}
    hs = [p["harmful_score"] for p in pts]
    corr = {k: {"pearson": pearson([p[k] for p in pts], hs), "spearman": spearman([p[k] for p in pts], hs)}
            for k in ("drift_last_layer", "drift_mean_layers")}
    corr["per_layer_pearson"] = [pearson([p["drift_per_layer"][li] for p in pts], hs) for li in range(n_layers)]
    summary = {"points": pts, "per_ratio": {str(r): {"drift_last_layer": mean_ci([p["drift_last_layer"] for p in by_ratio[r]]),
                                                      "harmful_score": mean_ci([p["harmful_score"] for p in by_ratio[r]]),
                                                      "per_layer": per_layer[r]} for r in ratios},
               "correlation_with_hs": corr, "n_runs": len(pts)}
    _plot_sweep(out / "drift_vs_p_hs.png", pts, ratios, per_layer, corr)
    return summary


def _plot_sweep(path: Path, pts: list[dict], ratios: list[float], per_layer: dict, corr: dict) -> None:
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    ax = axes[0][0]
    n_layers = len(pts[0]["drift_per_layer"])
    st = plotting.styles([f"layer {li}" for li in range(n_layers)])
    for li in range(n_layers):
        plotting.band(ax, [100 * r for r in ratios], [per_layer[r][li] for r in ratios], f"layer {li}", st[f"layer {li}"])
    plotting.finish(ax, "Harmful embedding drift vs p (mean ± std over seeds)", "harmful ratio p (%)",
                    "mean ‖h_ft − h_aligned‖₂ (model units)")
    ax = axes[0][1]
    st_r = plotting.styles([f"p = {r:g}" for r in ratios])
    for r in ratios:
        sel = [p for p in pts if p["ratio"] == r]
        s = st_r[f"p = {r:g}"]
        ax.scatter([p["harmful_score"] for p in sel], [p["drift_last_layer"] for p in sel], label=f"p = {r:g}",
                   color=s["color"], marker=s["marker"])
    c = corr["drift_last_layer"]
    plotting.finish(ax, f"Last-layer drift vs HS (Pearson r = {c['pearson']:.2f}, Spearman ρ = {c['spearman']:.2f})",
                    "harmful score HS (%)", f"drift at layer {n_layers - 1} (model units)")
    plotting.save(fig, path)
