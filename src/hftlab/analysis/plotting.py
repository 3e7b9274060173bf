"""The bench's plot style (:mod:`hftlab.plots`) for the analyses: one figure helper, one saver, one
colour/marker per series, mean ± std bands over seeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..plots import _plt, _styles


def figure(width: float = 7, height: float = 4.5, ncols: int = 1) -> tuple[Any, Any]:
    plt = _plt()
    return plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)


def styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return _styles(list(names))


def finish(ax: Any, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    """Title, axis labels (with units), grid, legend; integer ticks on a layer, position or step axis."""
    from matplotlib.ticker import MaxNLocator

    if any(w in xlabel for w in ("layer", "position", "tokens k")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def band(ax: Any, x: Sequence[float], stats: Sequence[dict[str, float]], label: str, style: dict[str, Any]) -> None:
    """A mean line with mean ± std over seeds shaded (the 95 % intervals are in the JSON: with three
    seeds they are 2.5 stds wide and would hide the curves); on a log axis the band stays above 0."""
    import math

    mean = [s["mean"] for s in stats]
    half = [0.0 if math.isnan(s.get("std", float("nan"))) else s["std"] for s in stats]
    low = [m - h for m, h in zip(mean, half)]
    if ax.get_yscale() == "log":
        low = [max(lo, 0.2 * m) for lo, m in zip(low, mean)]
    ax.plot(x, mean, label=label, markersize=5, **style)
    ax.fill_between(x, low, [m + h for m, h in zip(mean, half)], color=style["color"], alpha=0.15, lw=0)
