"""Shallow safety alignment (Qi, Panda, Lyu, Ma, Roy, Beirami, Mittal, Henderson, *Safety Alignment
Should Be Made More Than Just a Few Tokens Deep*, arXiv 2406.05946).

The paper's observations: (1) alignment changes the model's next-token distribution on harmful answers
mostly at the first few answer tokens — the per-token KL(π_aligned ‖ π_base) along harmful answers is
large at the first positions and small after; fine-tuning attacks also move the first tokens most;
(2) prefilling the first k tokens of a harmful answer raises the harmful score quickly with k.

Measured here on held-out harmful prompts with a compliant answer, teacher-forced:
``KL(π_aligned ‖ π_base)`` and ``KL(π_ft ‖ π_aligned)`` at answer position t (t = 0 the first answer
token; nats, mean over prompts that reach t); and HS of greedy answers when the first k answer tokens
are forced, k = 0 … 10, for the aligned and the final model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.example import Example
from ..data.format import Formatter
from . import plotting
from .common import Subject, answer_batches, answer_logprobs, harmful_score, mean_ci

MAX_POSITIONS = 40
PREFILL_K = tuple(range(11))
_ALIGNED_CURVES: dict[tuple, list[dict[str, float]]] = {}


@torch.no_grad()
def per_position_kl(p_model: nn.Module, q_model: nn.Module, fmt: Formatter, examples: Sequence[Example],
                    max_positions: int = MAX_POSITIONS, batch_size: int = 64) -> dict[str, list[float]]:
    """Mean KL(P ‖ Q) (nats) of the next-token distributions at answer position t, t < max_positions,
    teacher-forced on ``examples``' answers; ``count``: how many answers reach t."""
    sums = torch.zeros(max_positions, dtype=torch.float64)
    counts = torch.zeros(max_positions, dtype=torch.float64)
    for batch in answer_batches(fmt, examples, batch_size):
        lp, mask = answer_logprobs(p_model, batch)
        lq, _ = answer_logprobs(q_model, batch)
        kl = (lp.exp() * (lp - lq)).sum(-1).double()  # (B, T-1)
        pos = mask.long().cumsum(-1) - 1  # answer position of each predicted token
        keep = mask & (pos < max_positions)
        sums.index_add_(0, pos[keep], kl[keep])
        counts.index_add_(0, pos[keep], torch.ones_like(kl[keep]))
    n = int((counts > 0).sum())
    return {"kl": (sums[:n] / counts[:n]).tolist(), "count": counts[:n].long().tolist()}


def prefill_curve(subject: Subject, model: nn.Module, examples: Sequence[Example],
                  ks: Sequence[int] = PREFILL_K) -> list[dict[str, float]]:
    """HS (%) of answers whose first k tokens are the harmful reference answer's, for each k."""
    fmt = subject.formatter()
    ids = [fmt.ids(ex.response) for ex in examples]
    return [{"k": k, **harmful_score(subject, model, examples, [i[:k] for i in ids])} for k in ks]


def run(subject: Subject, out: Path, n_prompts: int = 200, n_prefill: int = 100,
        ks: Sequence[int] = PREFILL_K) -> dict[str, Any]:
    fmt = subject.formatter()
    data = subject.eval_harmful(max(n_prompts, n_prefill))
    bs = subject.cfg.eval.batch_size
    result: dict[str, Any] = {"n_prompts": min(n_prompts, len(data)), "units": "KL in nats; HS in %"}
    if subject.base != subject.aligned:
        result["kl_aligned_vs_base"] = per_position_kl(subject.model("aligned"), subject.model("base"), fmt,
                                                       data[:n_prompts], batch_size=bs)
    result["kl_finetuned_vs_aligned"] = per_position_kl(subject.model("final"), subject.model("aligned"), fmt,
                                                        data[:n_prompts], batch_size=bs)
    key = (subject.aligned, n_prefill, tuple(ks))  # runs sharing an aligned model share its curve
    if key not in _ALIGNED_CURVES:
        _ALIGNED_CURVES[key] = prefill_curve(subject, subject.model("aligned"), data[:n_prefill], ks)
    result["prefill"] = {"n_prompts": min(n_prefill, len(data)), "aligned": _ALIGNED_CURVES[key],
                         "final": prefill_curve(subject, subject.model("final"), data[:n_prefill], ks)}
    _plot(out / "shallow.png", result, subject.name)
    return result


def _plot(path: Path, result: dict[str, Any], name: str) -> None:
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    ax = axes[0][0]
    series = {k: result[k]["kl"] for k in ("kl_aligned_vs_base", "kl_finetuned_vs_aligned") if k in result}
    labels = {"kl_aligned_vs_base": "KL(aligned ‖ base)", "kl_finetuned_vs_aligned": "KL(fine-tuned ‖ aligned)"}
    st = plotting.styles(list(labels.values()))
    for k, v in series.items():
        ax.plot(range(len(v)), v, label=labels[k], **st[labels[k]])
    plotting.finish(ax, f"Per-token KL along harmful answers ({name[:12]})", "answer token position t",
                    "mean KL (nats)")
    ax = axes[0][1]
    st = plotting.styles(["aligned", "final"])
    for which in ("aligned", "final"):
        pts = result["prefill"][which]
        ax.plot([p["k"] for p in pts], [p["harmful_score"] for p in pts], label=which, **st[which])
    ax.set_ylim(-2, 102)
    plotting.finish(ax, "Prefilling attack", "forced harmful answer tokens k", "harmful score HS (%)")
    plotting.save(fig, path)


def summarise(rows: Sequence[tuple[dict[str, Any], dict[str, Any]]], out: Path) -> dict[str, Any]:
    """Across runs: KL profiles and prefilling curves per p (mean ± std over seeds), and the share of
    the alignment KL carried by the first 5 answer tokens."""
    ratios = sorted({m["ratio"] for m, _ in rows})
    summary: dict[str, Any] = {"per_ratio": {}}
    first5 = []
    for m, r in rows:
        if "kl_aligned_vs_base" in r:
            kl = r["kl_aligned_vs_base"]["kl"]
            first5.append({"seed": m["seed"], "mean_kl_first5": sum(kl[:5]) / 5, "mean_kl_after5": sum(kl[5:]) / max(1, len(kl) - 5)})
    summary["aligned_vs_base_first5"] = first5
    for p in ratios:
        sel = [r for m, r in rows if m["ratio"] == p]
        n_pos = min(len(r["kl_finetuned_vs_aligned"]["kl"]) for r in sel)
        ks = [x["k"] for x in sel[0]["prefill"]["final"]]
        summary["per_ratio"][str(p)] = {
            "kl_finetuned_vs_aligned": [mean_ci([r["kl_finetuned_vs_aligned"]["kl"][t] for r in sel]) for t in range(n_pos)],
            "prefill_final": [mean_ci([r["prefill"]["final"][i]["harmful_score"] for r in sel]) for i in range(len(ks))],
            "prefill_aligned": [mean_ci([r["prefill"]["aligned"][i]["harmful_score"] for r in sel]) for i in range(len(ks))],
            "k": ks}
    _plot_sweep(out / "shallow_sweep.png", summary, ratios)
    return summary


def _plot_sweep(path: Path, summary: dict[str, Any], ratios: list[float]) -> None:
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    labels = [f"p = {p:g}" for p in ratios]
    st = plotting.styles(labels + ["aligned (all runs)"])
    for p, lab in zip(ratios, labels):
        d = summary["per_ratio"][str(p)]
        kl = d["kl_finetuned_vs_aligned"]
        plotting.band(axes[0][0], list(range(len(kl))), kl, lab, st[lab])
        plotting.band(axes[0][1], d["k"], d["prefill_final"], lab, st[lab])
    d0 = summary["per_ratio"][str(ratios[0])]
    plotting.band(axes[0][1], d0["k"], d0["prefill_aligned"], "aligned (all runs)", {**st["aligned (all runs)"], "ls": "--"})
    plotting.finish(axes[0][0], "KL(fine-tuned ‖ aligned) along harmful answers", "answer token position t",
                    "mean KL (nats), mean ± std over seeds")
    axes[0][1].set_ylim(-2, 102)
    plotting.finish(axes[0][1], "Prefilling attack on the final model", "forced harmful answer tokens k",
                    "harmful score HS (%)")
    plotting.save(fig, path)
