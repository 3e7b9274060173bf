"""PNG plots for reports: HS vs p per method, HS–FA scatter, overhead bars (matplotlib, Agg)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from .report import value


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^vP*X"


def _styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One (colour, marker) pair per method: 10 strong colours × 8 markers, so overlapping curves and
    neighbouring points stay distinguishable."""
    cmap = _plt().get_cmap("tab10")
    return {n: {"color": cmap(i % 10), "marker": MARKERS[(i // 10 + i) % len(MARKERS)]} for i, n in enumerate(names)}


def plot_hs_vs_p(path: Path, results: Sequence[dict[str, Any]], methods: Sequence[str], ratios: Sequence[float]) -> None:
    plt = _plt()
    styles = _styles(methods)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = [(p, statistics.mean(hs)) for p in ratios
               if (hs := [r["harmful_score"] for r in results if value(r, "defense.name") == m
                          and value(r, "attack.ratio") == p])]
        if pts:
            ax.plot([100 * p for p, _ in pts], [h for _, h in pts], label=m, markersize=6, alpha=0.9, **styles[m])
    ax.set_xlabel("harmful ratio p of the user data (%)")
    ax.set_ylabel("harmful score HS (%)")
    ax.set_title("Harmful score vs harmful ratio (organism, n = 1000)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_hs_fa(path: Path, results: Sequence[dict[str, Any]], methods: Sequence[str]) -> None:
    plt = _plt()
    styles = _styles(methods)
    fig, ax = plt.subplots(figsize=(7, 5))
    for m in methods:
        rs = [r for r in results if value(r, "defense.name") == m]
        if not rs:
            continue
        hs = [r["harmful_score"] for r in rs]
        fa = [r["finetune_accuracy"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        ax.errorbar(statistics.mean(hs), statistics.mean(fa), xerr=sd(hs), yerr=sd(fa), fmt=styles[m]["marker"],
                    color=styles[m]["color"], label=m, capsize=3, markersize=7)
    sft = [r for r in results if value(r, "defense.name") == "sft"]
    if sft:  # the papers' claim: left of SFT's HS, above SFT's FA − 5
        ax.axvline(statistics.mean(r["harmful_score"] for r in sft), color="grey", ls="--", lw=1, label="SFT's HS")
        ax.axhline(statistics.mean(r["finetune_accuracy"] for r in sft) - 5, color="grey", ls=":", lw=1,
                   label="SFT's FA − 5")
    ax.set_xlabel("harmful score HS (%)  ← safer")
    ax.set_ylabel("fine-tune accuracy FA (%)  ↑ better")
    ax.set_title("Safety vs utility per method (p = 0.1, mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overhead(path: Path, ratios: dict[str, float]) -> None:
    from . import registry

    plt = _plt()
    names = sorted(ratios, key=ratios.get)
    stage = {n: registry.entry("defense", n).stage for n in names}
    palette = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(("none", "align", "finetune", "repair"))}
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5))
    bars = ax.barh(names, [ratios[n] for n in names], color=[palette.get(stage[n], "grey") for n in names])
    ax.bar_label(bars, labels=[f"{ratios[n]:.2f}×" for n in names], padding=3, fontsize=8)
    ax.set_xlim(0, max(ratios.values()) * 1.15)
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=palette[s]) for s in palette if s in stage.values()],
              labels=[s for s in palette if s in stage.values()], title="stage", fontsize=8, loc="lower right")
    ax.set_xlabel("time per training step relative to SFT (×); repairs: repair time / fine-tuning time")
    ax.set_title("System overhead of each defense (organism, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bench(out: Path, main: Sequence[dict], curves: Sequence[dict], ratios: dict[str, float],
               p1: Sequence[str], p_values: Sequence[float]) -> None:
    methods = list(dict.fromkeys(value(r, "defense.name") for r in main))
    plot_hs_fa(out / "hs_fa_scatter.png", main, methods)
    if curves:
        plot_hs_vs_p(out / "hs_vs_p.png", curves, p1, p_values)
    if ratios:
        plot_overhead(out / "overhead.png", ratios)
