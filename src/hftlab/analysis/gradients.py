"""Gradient similarity between the user's data and the alignment loss.

The observation behind Lisa and Booster (Huang et al., *Lisa: Lazy Safety Alignment for Large Language
Models against Harmful Fine-tuning Attack*, arXiv 2405.18641; *Booster: Tackling Harmful Fine-tuning
for Large Language Models via Attenuating Harmful Perturbation*, arXiv 2409.01586) is that a step on
harmful data raises the alignment loss, i.e. the harmful-data gradient points against the alignment
gradient, while benign data interferes less. Measured here as the cosine between the gradients of the
mean token loss over

- the user's harmful data (the attack's harmful split) and over its benign task data, and
- the alignment loss (the alignment data's harmful → refusal rows, and the whole alignment mix),

with respect to every weight of the model, at the aligned and at the final model, overall and per
decoder layer. A negative cosine means a descent step on that data ascends the alignment loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.example import Example
from ..data.format import IGNORE, Formatter
from ..defenses.base import upcast
from ..models.introspect import layer_index_of
from . import plotting
from .common import Subject, device_of, mean_ci

N_EXAMPLES = 128
PAIRS = (("harmful", "alignment_refusal"), ("benign", "alignment_refusal"), ("harmful", "alignment"),
         ("benign", "alignment"), ("harmful", "benign"))


def set_gradient(model: nn.Module, fmt: Formatter, examples: Sequence[Example],
                 batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Gradient of the mean next-token loss over all answer tokens of ``examples`` (float32, CPU), for
    every parameter that requires a gradient. Batches are summed, so the result does not depend on the
    batch size."""
    feats = fmt.encode_all(examples)
    total = sum(sum(1 for x in f["labels"][1:] if x != IGNORE) for f in feats)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    dev = device_of(model)
    for i in range(0, len(feats), batch_size):
        b = {k: v.to(dev) for k, v in fmt.collate(feats[i: i + batch_size]).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = F.cross_entropy(upcast(logits[:, :-1]).reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE, reduction="sum") / total
        loss.backward()
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> float:
    """Cosine between two gradients flattened over ``names`` (default: all shared parameters)."""
    names = [n for n in (names if names is not None else a) if n in b]
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in names)
    na = sum(float(a[n].double().pow(2).sum()) for n in names) ** 0.5
    nb = sum(float(b[n].double().pow(2).sum()) for n in names) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def gradient_cosines(model: nn.Module, fmt: Formatter, sets: dict[str, Sequence[Example]],
                     batch_size: int = 16) -> dict[str, Any]:
    """Cosines of every pair in :data:`PAIRS` (overall and per decoder layer) and the gradient norms."""
    model.requires_grad_(True)
    grads = {k: set_gradient(model, fmt, v, batch_size) for k, v in sets.items()}
    model.requires_grad_(False)
    layer_of = layer_index_of(model)
    n_layers = 1 + max(layer_of.values())
    out: dict[str, Any] = {"norm": {k: grad_norm(g) for k, g in grads.items()}, "overall": {}, "per_layer": {}}
    for a, b in PAIRS:
        if a in grads and b in grads:
            key = f"{a}~{b}"
            out["overall"][key] = cosine(grads[a], grads[b])
            out["per_layer"][key] = [cosine(grads[a], grads[b], [n for n, li in layer_of.items() if li == layer])
                                     for layer in range(n_layers)]
    return out


def grad_norm(g: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().pow(2).sum()) for t in g.values()) ** 0.5


def run(subject: Subject, out: Path, n_examples: int = N_EXAMPLES) -> dict[str, Any]:
    fmt = subject.formatter()
    src = subject.source
    align = subject.source.alignment(subject.cfg.data.alignment_n)
    sets = {"harmful": src.harmful("attack", n_examples),
            "benign": subject.task().examples(src, "train", n_examples),
            "alignment_refusal": [ex for ex in align if ex.kind == "refusal"][:n_examples],
            "alignment": align[:n_examples]}
    sets = {k: v for k, v in sets.items() if v}
    result: dict[str, Any] = {"n_examples": {k: len(v) for k, v in sets.items()}, "units": "cosine (−1 … 1)"}
    for which in ("aligned", "final"):
        result[which] = gradient_cosines(subject.fresh(which), fmt, sets)
    _plot(out / "gradient_cosine.png", result, subject.name)
    return result


def _plot(path: Path, result: dict[str, Any], name: str) -> None:
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    for ax, which in zip(axes[0], ("aligned", "final")):
        per_layer = result[which]["per_layer"]
        st = plotting.styles(list(per_layer))
        for key, vals in per_layer.items():
            ax.plot(range(len(vals)), vals, label=f"{key} (all: {result[which]['overall'][key]:+.2f})", **st[key])
        ax.axhline(0, color="black", lw=0.8)
        top = max([abs(v) for vals in per_layer.values() for v in vals if v == v] + [0.05])
        ax.set_ylim(-1.15 * top, 1.15 * top)  # symmetric about 0, so the sign reads at a glance
        plotting.finish(ax, f"Gradient cosines at the {which} model ({name[:12]})", "decoder layer",
                        "cosine between gradients")
    plotting.save(fig, path)


def summarise(rows: Sequence[tuple[dict[str, Any], dict[str, Any]]], out: Path) -> dict[str, Any]:
    """Across runs: overall cosines at the aligned and the final model per p (mean ± std over seeds)."""
    ratios = sorted({m["ratio"] for m, _ in rows})
    keys = list(rows[0][1]["final"]["overall"])
    summary = {which: {key: {str(p): mean_ci([r[which]["overall"][key] for m, r in rows if m["ratio"] == p])
                             for p in ratios} for key in keys} for which in ("aligned", "final")}
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    st = plotting.styles(keys)
    for ax, which in zip(axes[0], ("aligned", "final")):
        for key in keys:
            plotting.band(ax, [100 * p for p in ratios], [summary[which][key][str(p)] for p in ratios], key, st[key])
        ax.axhline(0, color="black", lw=0.8)
        plotting.finish(ax, f"Gradient cosines at the {which} model vs p", "harmful ratio p (%)",
                        "cosine (mean ± std over seeds)")
    plotting.save(fig, out / "gradient_cosine_vs_p.png")
    return summary
