"""Weight drift per layer and module between the aligned and the fine-tuned model, and the geometry of
the fine-tuning update against the alignment update.

Measured: for each linear weight of each decoder layer, ‖W_ft − W_aligned‖_F (absolute, and relative to
‖W_aligned‖_F), and ‖W_aligned − W_base‖_F as the alignment's own scale; every other parameter
(embeddings, norms) by name. The subspace comparison follows the safety-subspace analyses of Safe LoRA
(Hsu et al., arXiv 2405.16833) and of low-rank safety regions (Wei et al., *Assessing the Brittleness of
Safety Alignment via Pruning and Low-Rank Modifications*, arXiv 2402.05162): the principal angles
between the column (output) spaces of the top-r singular vectors of the fine-tuning update ΔW_ft (rank r
for a LoRA fine-tune, r its rank) and of the alignment update ΔW_align. The summary is the mean squared
cosine of the r angles, ‖U_ftᵀ U_align‖²_F / r, against r / d, its expected value for random subspaces
of the d-dimensional output space: above r / d, fine-tuning writes into the directions alignment wrote.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..defenses._weights import targets
from . import plotting
from .common import Subject, mean_ci


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``a`` (d×p) and ``b`` (d×q)."""
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    s = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(s).sort().values


def top_left(m: torch.Tensor, r: int) -> torch.Tensor:
    """The top-r left singular vectors of ``m`` (its main output directions)."""
    u, _, _ = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, :r]


def weight_drift(final: nn.Module, aligned: nn.Module, base: nn.Module | None = None,
                 rank: int = 8) -> dict[str, Any]:
    """Per linear weight of the decoder layers: drift norms and update-subspace overlaps; per other
    parameter: drift norm."""
    tf, ta = targets(final), targets(aligned)
    tb = targets(base) if base is not None else {}
    rows = []
    for name, t in ta.items():
        w_al, w_ft = t.read(), tf[name].read()
        d_ft = w_ft - w_al
        row: dict[str, Any] = {"name": name, "layer": t.layer, "module": name.split(".", 1)[1],
                               "drift": float(d_ft.norm()), "relative": float(d_ft.norm() / w_al.norm()),
                               "shape": list(w_al.shape)}
        if name in tb:
            d_al = w_al - tb[name].read()
            row["alignment_drift"] = float(d_al.norm())
            r = min(rank, *d_ft.shape)
            if float(d_ft.norm()) > 0 and float(d_al.norm()) > 0:
                ang = principal_angles(top_left(d_ft, r), top_left(d_al, r))
                row["mean_cos2"] = float(torch.cos(ang).pow(2).mean())
                row["min_angle_deg"] = math.degrees(float(ang[0]))
                row["random_cos2"] = r / d_ft.shape[0]
        rows.append(row)
    lin = {id(t.module.weight) for t in ta.values()}
    other = {}
    fp = dict(final.named_parameters())
    for n, p in aligned.named_parameters():
        if id(p) not in lin and n in fp:
            other[n] = float((fp[n].detach().float() - p.detach().float()).norm())
    n_layers = 1 + max(r["layer"] for r in rows)
    per_layer = [math.sqrt(sum(r["drift"] ** 2 for r in rows if r["layer"] == li)) for li in range(n_layers)]
    return {"targets": rows, "other": other, "per_layer": per_layer,
            "total": math.sqrt(sum(r["drift"] ** 2 for r in rows) + sum(v ** 2 for v in other.values()))}


def run(subject: Subject, out: Path) -> dict[str, Any]:
    ft = subject.cfg.finetune
    base = subject.model("base") if subject.base != subject.aligned else None
    result = weight_drift(subject.model("final"), subject.model("aligned"), base, rank=ft.lora_r if ft.lora else 8)
    result["rank"] = ft.lora_r if ft.lora else 8
    result["units"] = "Frobenius norm (weight units); relative = ‖ΔW‖/‖W_aligned‖; angles in degrees"
    _plot(out / "weight_drift.png", result, subject.name)
    return result


def _plot(path: Path, result: dict[str, Any], name: str) -> None:
    rows = result["targets"]
    moved = {r["module"] for r in rows if r["drift"] > 0}
    modules = [m for m in dict.fromkeys(r["module"] for r in rows) if m in moved]
    still = sorted({r["module"] for r in rows} - moved)
    n_layers = len(result["per_layer"])
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    ax = axes[0][0]
    st = plotting.styles(modules)
    for m in modules:
        pts = sorted((r["layer"], r["relative"]) for r in rows if r["module"] == m)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], label=m, **st[m])
    ax.set_xticks(range(n_layers))
    if still:
        ax.text(0.02, 0.02, f"unchanged: {', '.join(still)}", transform=ax.transAxes, fontsize=7, color="grey")
    plotting.finish(ax, f"Weight drift aligned → fine-tuned ({name[:12]})", "decoder layer",
                    "‖W_ft − W_aligned‖_F / ‖W_aligned‖_F (%)")
    ax = axes[0][1]
    with_angles = [r for r in rows if "mean_cos2" in r and r["drift"] > 0]
    for m in modules:
        pts = sorted((r["layer"], r["mean_cos2"]) for r in with_angles if r["module"] == m)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **st[m])
    if with_angles:
        ax.axhline(with_angles[0]["random_cos2"], color="grey", ls="--", lw=1, label="random subspaces (r/d)")
    ax.set_xticks(range(n_layers))
    ax.set_ylim(0, 1.02)
    plotting.finish(ax, f"Overlap of the top-{result['rank']} update subspaces", "decoder layer",
                    "mean cos² of principal angles (ΔW_ft vs ΔW_align)")
    plotting.save(fig, path)


def summarise(rows: Sequence[tuple[dict[str, Any], dict[str, Any]]], out: Path) -> dict[str, Any]:
    """Across runs: total drift and mean subspace overlap per p (mean ± std over seeds)."""
    ratios = sorted({m["ratio"] for m, _ in rows})

    def overlap(r: dict[str, Any]) -> float:
        vals = [t["mean_cos2"] for t in r["targets"] if "mean_cos2" in t and t["drift"] > 0]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {str(p): {"total_drift": mean_ci([r["total"] for m, r in rows if m["ratio"] == p]),
                        "mean_cos2": mean_ci([overlap(r) for m, r in rows if m["ratio"] == p])} for p in ratios}
    random = next((t["random_cos2"] for _, r in rows for t in r["targets"] if "random_cos2" in t), None)
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    x = [100 * p for p in ratios]
    st = plotting.styles(["drift", "overlap"])
    plotting.band(axes[0][0], x, [summary[str(p)]["total_drift"] for p in ratios], "total ‖θ_ft − θ_aligned‖", st["drift"])
    plotting.finish(axes[0][0], "Weight drift vs p", "harmful ratio p (%)", "Frobenius norm (weight units)")
    plotting.band(axes[0][1], x, [summary[str(p)]["mean_cos2"] for p in ratios], "ΔW_ft vs ΔW_align", st["overlap"])
    if random is not None:
        axes[0][1].axhline(random, color="grey", ls="--", lw=1, label="random subspaces (r/d)")
    plotting.finish(axes[0][1], "Update-subspace overlap vs p", "harmful ratio p (%)", "mean cos² of principal angles")
    plotting.save(fig, out / "weight_drift_vs_p.png")
    return {"per_ratio": summary, "random_cos2": random}
