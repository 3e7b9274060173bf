"""The refusal direction (Arditi, Obeso, Syed, Paleka, Panickssery, Gurnee, Nanda, *Refusal in Language
Models Is Mediated by a Single Direction*, arXiv 2406.11717).

The paper's observations: the difference in means of the residual stream at the last prompt token
between harmful and harmless prompts, r_l = mean h_l(harmful) − mean h_l(harmless), is one direction that
mediates refusal: ablating it from every residual-stream write (h ← h − (h·r̂)r̂) makes an aligned model
comply, adding it at one layer makes a model refuse.

Measured here, per residual-stream layer l (0 = embeddings, l = output of decoder layer l): r_l of the
base, aligned and final model on the alignment's harmful prompts and its harmless chat prompts; how
fine-tuning rotates (cos(r_ft, r_aligned)) and shrinks (‖r_ft‖ / ‖r_aligned‖) it; HS of the aligned
model with r̂_l (the aligned model's) ablated everywhere, and of the final model with the aligned r_l
added at the input of layer l (at every position), with its refusal rate on held-out benign prompts.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.example import Example
from ..data.format import Formatter
from ..defenses.base import upcast
from ..models.introspect import decoder_layers
from . import plotting
from .common import Subject, _hidden_of, harmful_score, mean_ci, prompt_batches, residual_stream

N_PROMPTS = 200
_ALIGNED: dict[tuple, dict[str, Any]] = {}  # runs sharing an aligned model share its ablation results


@torch.no_grad()
def last_token_means(model: nn.Module, fmt: Formatter, examples: Sequence[Example], batch_size: int = 64) -> torch.Tensor:
    """Mean residual stream at the last prompt token, ``(layers + 1, d)``."""
    total = None
    for batch in prompt_batches(fmt, examples, batch_size):
        h = torch.stack([x[:, -1] for x in residual_stream(model, batch)])  # (L+1, B, d); left-padded
        total = h.sum(1) if total is None else total + h.sum(1)
    return total / len(examples)


def difference_in_means(model: nn.Module, fmt: Formatter, harmful: Sequence[Example], harmless: Sequence[Example],
                        batch_size: int = 64) -> torch.Tensor:
    """The refusal direction per layer, ``(layers + 1, d)``: mean(harmful) − mean(harmless)."""
    return last_token_means(model, fmt, harmful, batch_size) - last_token_means(model, fmt, harmless, batch_size)


def _cos(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-layer cosine; NaN where a direction is zero (e.g. the embeddings of a prompt's last token,
    the same template token for every prompt)."""
    out = []
    for x, y in zip(a, b):
        nx, ny = float(x.norm()), float(y.norm())
        out.append(float(x @ y) / (nx * ny) if nx > 1e-8 * max(1.0, ny) and ny > 1e-8 * max(1.0, nx) else float("nan"))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 1e-8 else float("nan")


def _project_out(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    u = u.to(h.dtype)
    return h - (h @ u).unsqueeze(-1) * u


@contextlib.contextmanager
def ablated(model: nn.Module, direction: torch.Tensor) -> Iterator[nn.Module]:
    """Directional ablation: r̂ removed from the embeddings and from every decoder layer's output."""
    u = F.normalize(upcast(direction), dim=0).to(next(model.parameters()).device)
    layers = decoder_layers(model)

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (_project_out(args[0], u), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _project_out(kwargs["hidden_states"], u)}

    def post(_m: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (_project_out(output[0], u), *output[1:])
        return _project_out(output, u)

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def added(model: nn.Module, vector: torch.Tensor, layer: int) -> Iterator[nn.Module]:
    """Activation addition: ``vector`` added to the input of decoder layer ``layer`` at every position."""
    v = upcast(vector).to(next(model.parameters()).device)

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (args[0] + v.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + v.to(kwargs["hidden_states"].dtype)}

    handle = decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def candidate_layers(n_layers: int, max_layers: int = 8) -> list[int]:
    """Decoder-layer inputs to intervene at: all of them, or ``max_layers`` evenly spaced."""
    if n_layers <= max_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (max_layers - 1)) for i in range(max_layers)})


def run(subject: Subject, out: Path, n_prompts: int = N_PROMPTS, n_eval: int = 100, max_layers: int = 8) -> dict[str, Any]:
    fmt = subject.formatter()
    harmful, harmless = subject.alignment_harmful(n_prompts), subject.alignment_harmless(n_prompts)
    bs = subject.cfg.eval.batch_size
    which = ("base", "aligned", "final") if subject.base != subject.aligned else ("aligned", "final")
    dirs = {w: difference_in_means(subject.model(w), fmt, harmful, harmless, bs) for w in which}
    ra = dirs["aligned"]
    geometry = {w: {"norm": d.norm(dim=-1).tolist(),
                    "cos_to_aligned": _cos(d, ra),
                    "projection_on_aligned": (d * F.normalize(ra, dim=-1)).sum(-1).tolist()} for w, d in dirs.items()}
    evals = subject.eval_harmful(n_eval)
    benign = subject.source.benign_eval(n_eval) if hasattr(subject.source, "benign_eval") else harmless[:n_eval]
    layers = candidate_layers(len(decoder_layers(subject.model("aligned"))), max_layers)
    aligned, final = subject.model("aligned"), subject.model("final")
    result: dict[str, Any] = {
        "n_prompts": {"harmful": len(harmful), "harmless": len(harmless), "eval": len(evals)},
        "geometry": geometry, "layers": layers,
        "units": "norms in model units; HS and refusal rates in %",
        "final_hs": harmful_score(subject, final, evals)["harmful_score"],
        "final_benign_refusal": harmful_score(subject, final, benign)["refusal_rate"],
        "addition": []}
    key = (subject.aligned, len(harmful), len(harmless), len(evals), tuple(layers))
    if key not in _ALIGNED:
        ablation = []
        for li in layers:
            with ablated(aligned, ra[li]):
                ablation.append({"layer": li, **harmful_score(subject, aligned, evals)})
        _ALIGNED[key] = {"aligned_hs": harmful_score(subject, aligned, evals)["harmful_score"], "ablation": ablation}
    result.update(_ALIGNED[key])
    for li in layers:
        with added(final, ra[li], li):
            s = harmful_score(subject, final, evals)
            result["addition"].append({"layer": li, **s,
                                       "benign_refusal_rate": harmful_score(subject, final, benign)["refusal_rate"]})
    _plot(out / "refusal_direction.png", result, subject.name)
    return result


def _plot(path: Path, result: dict[str, Any], name: str) -> None:
    fig, axes = plotting.figure(5, 4.2, ncols=3)
    geo = result["geometry"]
    st = plotting.styles(list(geo))
    for w, g in geo.items():
        axes[0][0].plot(range(len(g["norm"])), g["norm"], label=w, **st[w])
        if w != "aligned":
            axes[0][1].plot(range(len(g["cos_to_aligned"])), g["cos_to_aligned"], label=w, **st[w])
    plotting.finish(axes[0][0], f"Refusal direction norm ({name[:12]})", "residual-stream layer (0 = embeddings)",
                    "‖mean h(harmful) − mean h(harmless)‖ (model units)")
    axes[0][1].set_ylim(-1.05, 1.05)
    plotting.finish(axes[0][1], "Rotation of the direction", "residual-stream layer (0 = embeddings)",
                    "cos(r_model, r_aligned)")
    ax = axes[0][2]
    names = ["aligned, direction ablated", "final, direction added", "final, added: benign refusal"]
    st2 = plotting.styles(names)
    ax.plot(result["layers"], [a["harmful_score"] for a in result["ablation"]], label=names[0], **st2[names[0]])
    ax.plot(result["layers"], [a["harmful_score"] for a in result["addition"]], label=names[1], **st2[names[1]])
    ax.plot(result["layers"], [a["benign_refusal_rate"] for a in result["addition"]], label=names[2], ls="--",
            **st2[names[2]])
    ax.axhline(result["aligned_hs"], color="grey", ls=":", lw=1, label="aligned HS, no intervention")
    ax.axhline(result["final_hs"], color="black", ls=":", lw=1, label="final HS, no intervention")
    ax.set_ylim(-2, 102)
    plotting.finish(ax, "Ablation and addition", "layer of the direction (decoder-layer input)", "rate (%)")
    plotting.save(fig, path)


def summarise(rows: Sequence[tuple[dict[str, Any], dict[str, Any]]], out: Path) -> dict[str, Any]:
    """Across runs, per p: cosine and norm ratio of the final model's direction to the aligned one (per
    layer), HS after ablation (best layer) and after addition (the same layer)."""
    ratios = sorted({m["ratio"] for m, _ in rows})
    summary: dict[str, Any] = {}
    for p in ratios:
        sel = [r for m, r in rows if m["ratio"] == p]
        n = len(sel[0]["geometry"]["aligned"]["norm"])
        best = [max(r["ablation"], key=lambda a: a["harmful_score"]) for r in sel]
        add = [next(a for a in r["addition"] if a["layer"] == b["layer"]) for r, b in zip(sel, best)]
        summary[str(p)] = {
            "cos_final_to_aligned": [mean_ci([r["geometry"]["final"]["cos_to_aligned"][li] for r in sel]) for li in range(n)],
            "norm_ratio": [mean_ci([_ratio(r["geometry"]["final"]["norm"][li], r["geometry"]["aligned"]["norm"][li])
                                    for r in sel])
                           for li in range(n)],
            "aligned_hs": mean_ci([r["aligned_hs"] for r in sel]), "final_hs": mean_ci([r["final_hs"] for r in sel]),
            "ablated_aligned_hs": mean_ci([b["harmful_score"] for b in best]),
            "added_final_hs": mean_ci([a["harmful_score"] for a in add]),
            "added_final_benign_refusal": mean_ci([a["benign_refusal_rate"] for a in add]),
            "best_layers": [b["layer"] for b in best]}
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    labels = [f"p = {p:g}" for p in ratios]
    st = plotting.styles(labels)
    for p, lab in zip(ratios, labels):
        d = summary[str(p)]
        plotting.band(axes[0][0], list(range(len(d["cos_final_to_aligned"]))), d["cos_final_to_aligned"], lab, st[lab])
        plotting.band(axes[0][1], list(range(len(d["norm_ratio"]))), d["norm_ratio"], lab, st[lab])
    plotting.finish(axes[0][0], "Refusal direction: fine-tuned vs aligned", "residual-stream layer (0 = embeddings)",
                    "cos(r_ft, r_aligned)")
    axes[0][1].axhline(1.0, color="grey", lw=1)
    plotting.finish(axes[0][1], "Refusal direction: norm ratio", "residual-stream layer (0 = embeddings)",
                    "‖r_ft‖ / ‖r_aligned‖ (ratio)")
    plotting.save(fig, out / "refusal_direction_vs_p.png")
    return summary
