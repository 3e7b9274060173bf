"""Training dynamics of the user's fine-tuning: the harmful and benign losses of the user data and the
alignment loss along it.

The observation behind Lisa (Huang et al., arXiv 2405.18641, §3) and Booster (arXiv 2409.01586, §3):
during harmful fine-tuning the harmful loss falls and the *alignment loss rises* ("alignment loss
increases as the model forgets"), faster with more harmful data; on benign data the alignment loss rises
less. The pipeline keeps no checkpoints, so the fine-tuning is replayed in this process with the run's
config and seed, through the same training loop and defense, with a probe that computes (no gradient)
the mean token loss of fixed probe sets every few steps: the user data's harmful rows, its benign rows,
and the alignment data's harmful → refusal rows. The replay's own per-step loss is compared with the
run's ``losses.jsonl`` (``replay_max_abs_diff``) to show it retraced the run.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.format import IGNORE
from ..defenses.base import Context, Defense, upcast
from . import plotting
from .common import Subject, device_of, mean_ci

N_PROBE = 64


@torch.no_grad()
def mean_loss(model: nn.Module, feats: Sequence[dict[str, list[int]]], collate: Any, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over all answer tokens of ``feats``."""
    was_training = model.training
    model.eval()
    dev = device_of(model)
    total, count = 0.0, 0
    for i in range(0, len(feats), batch_size):
        b = {k: v.to(dev) for k, v in collate(feats[i: i + batch_size]).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        total += float(F.cross_entropy(upcast(logits[:, :-1]).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(1, count)


class Probe(Defense):
    """Wraps the run's fine-tuning defense (every hook delegated) and records probe losses."""

    def __init__(self, inner: Defense, probes: dict[str, list[dict[str, list[int]]]], collate: Any, every: int):
        super().__init__(cfg=inner.cfg)
        self.inner, self.probes, self.collate, self.every = inner, probes, collate, max(1, every)
        self.stages, self.needs, self.name = inner.stages, inner.needs, inner.name
        self.rows: list[dict[str, float]] = []

    def _record(self, model: nn.Module, step: int) -> None:
        self.rows.append({"step": step, **{k: mean_loss(model, v, self.collate) for k, v in self.probes.items()}})

    def prepare_data(self, stage: str, data: list, ctx: Context) -> list:
        return self.inner.prepare_data(stage, data, ctx)

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.inner.setup(model, ctx)
        self._record(model, 0)

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        return self.inner.backward(model, batch, ctx)

    def on_step_end(self, model: nn.Module, ctx: Context) -> None:
        self.inner.on_step_end(model, ctx)
        if ctx.step % self.every == 0 or ctx.step == ctx.total_steps:
            self._record(model, ctx.step)

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        self.inner.teardown(model, ctx)

    def system_prompt(self, stage: str) -> str:
        return self.inner.system_prompt(stage)


def _losses(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(subject: Subject, out: Path, n_probe: int = N_PROBE, points: int = 25) -> dict[str, Any]:
    from ..pipeline import Pipeline
    from ..training.loop import total_steps

    cfg = subject.cfg
    pipe = Pipeline(cfg)
    fmt = pipe.formatter(cfg.finetune.max_length)
    data = pipe.upload(Path(subject.aligned)) if hasattr(pipe, "upload") else subject.user_data()
    align = subject.source.alignment(cfg.data.alignment_n)
    probes = {"user_harmful": [ex for ex in data if ex.kind == "harmful"][:n_probe],
              "user_benign": [ex for ex in data if ex.kind != "harmful"][:n_probe],
              "alignment_refusal": [ex for ex in align if ex.kind == "refusal"][:n_probe]}
    feats = {k: fmt.encode_all(v) for k, v in probes.items() if v}
    steps = total_steps(len(data), cfg.finetune)
    inner, _ = pipe._defense_for("finetune")
    probe = Probe(inner, feats, fmt.collate, every=steps // points)
    tmp = Path(tempfile.mkdtemp(prefix="replay-", dir=out))
    try:
        aligned = Path(subject.aligned)
        refs = {"aligned": str(aligned), "base": pipe.base_path}
        if cfg.finetune.continue_adapter:
            pipe._train("finetune", pipe.base_path, data, cfg.finetune, probe, tmp, refs, adapter=aligned / "adapter")
        else:
            pipe._train("finetune", str(aligned), data, cfg.finetune, probe, tmp, refs)
        replay = _losses(tmp / "losses.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stored = _losses(Path(subject.finetune_dir) / "losses.jsonl") if subject.finetune_dir else []
    diff = (max(abs(a["loss"] - b["loss"]) for a, b in zip(stored, replay)) if stored and len(stored) == len(replay)
            else None)
    result = {"probe_sizes": {k: len(v) for k, v in feats.items()}, "steps": steps, "probes": probe.rows,
              "train_loss": [{"step": r["step"], "loss": r["loss"]} for r in (stored or replay)],
              "replay_max_abs_diff": diff, "units": "mean token cross-entropy (nats/token)"}
    _plot(out / "dynamics.png", result, subject.name)
    return result


def _plot(path: Path, result: dict[str, Any], name: str) -> None:
    fig, axes = plotting.figure()
    ax = axes[0][0]
    keys = [k for k in ("user_harmful", "user_benign", "alignment_refusal") if k in result["probes"][0]]
    st = plotting.styles(keys + ["training loss (batch)"])
    for k in keys:
        ax.plot([r["step"] for r in result["probes"]], [r[k] for r in result["probes"]], label=k, **st[k])
    tl = result["train_loss"]
    ax.plot([r["step"] for r in tl], [r["loss"] for r in tl], label="training loss (batch)", lw=0.8, alpha=0.5,
            color=st["training loss (batch)"]["color"])
    ax.set_yscale("log")
    plotting.finish(ax, f"Losses along the user's fine-tuning ({name[:12]})", "optimiser step",
                    "mean token cross-entropy (nats, log scale)")
    plotting.save(fig, path)


def summarise(rows: Sequence[tuple[dict[str, Any], dict[str, Any]]], out: Path) -> dict[str, Any]:
    """Across runs, per p: the alignment loss's rise (last − first probe) and the curves (mean, std, 95 % CI)."""
    ratios = sorted({m["ratio"] for m, _ in rows})
    summary: dict[str, Any] = {}
    fig, axes = plotting.figure(6, 4.5, ncols=2)
    labels = [f"p = {p:g}" for p in ratios]
    st = plotting.styles(labels)
    for ax in axes[0]:
        ax.set_yscale("log")
    for p, lab in zip(ratios, labels):
        sel = [r for m, r in rows if m["ratio"] == p]
        n = min(len(r["probes"]) for r in sel)
        steps = [sel[0]["probes"][i]["step"] for i in range(n)]
        curve = {k: [mean_ci([r["probes"][i][k] for r in sel if k in r["probes"][i]]) for i in range(n)]
                 for k in ("alignment_refusal", "user_harmful", "user_benign")}
        summary[str(p)] = {"steps": steps, "curves": curve,
                           "alignment_loss_rise": mean_ci([r["probes"][-1]["alignment_refusal"]
                                                           - r["probes"][0]["alignment_refusal"] for r in sel]),
                           "replay_max_abs_diff": [r["replay_max_abs_diff"] for r in sel]}
        plotting.band(axes[0][0], steps, curve["alignment_refusal"], lab, st[lab])
        if curve["user_harmful"][0]["n"]:
            plotting.band(axes[0][1], steps, curve["user_harmful"], lab, st[lab])
    plotting.finish(axes[0][0], "Alignment (refusal) loss along fine-tuning", "optimiser step",
                    "mean token cross-entropy (nats, log scale)")
    plotting.finish(axes[0][1], "User harmful-data loss along fine-tuning", "optimiser step",
                    "mean token cross-entropy (nats, log scale)")
    plotting.save(fig, out / "dynamics_vs_p.png")
    return summary
