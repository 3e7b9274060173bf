"""RSN-Tune: find the safety-specific feed-forward neurons and align by tuning only them.

Paper: Zhao, Zhang, Xie, Goyal, Kawaguchi, Shieh, "Understanding and Enhancing Safety Mechanisms of LLMs
via Safety-Specific Neuron", ICLR 2025 (OpenReview yR47RmND1m; SN-Tune and RSN-Tune, Sections 3-4).
Reference: the authors' README and ``neuron_detection/neuron_detection.py`` (per-document top-k neurons
per layer, intersected over the corpus; ``top_number_ffn = 2000``), as carried in min-seong-kim/
Safety-Neuron @ 06e2e70, whose ``neuron_detection_rsn.py`` computes N_RSN = N_safe − (N_safe ∩ N_found).
Neuron importance: the PLND score of the same authors (Zhao et al. 2024, arXiv 2402.18815).

Importance of feed-forward neuron k of layer l on a document x (its prompt tokens): the change of the
layer output when the neuron is deactivated, Imp(k | x) = ‖h_¬k(x) − h(x)‖₂ = ‖W_down[:, k]‖₂·‖a_k(x)‖₂,
a_k(x) the neuron's activation (the input of the down projection) over the tokens. A neuron is activated
by x when it is among the top ``top_fraction`` of its layer; the corpus's neurons are those activated by
at least ``consistency`` of its documents (1.0: every document, the reference's intersection). Safety
neurons come from harmful prompts, foundation neurons from general (benign) prompts; the robust safety
neurons are N_RSN = N_safe − N_found. Neuron k owns row k of every up-side projection (gate, up; GPT-2's
``c_fc`` with its bias entry) and column k of the down projection.

Alignment (``stage align``): only those rows/columns train (every other weight has ``requires_grad``
off, the rest of the MLP weights get a zero gradient mask). ``protect=true`` adds the paper's other use:
in user fine-tuning the RSN of the aligned model are frozen (gradient mask 0 on their rows/columns) and
everything else trains as usual. Under LoRA the same masks act on the adapters: rows of the up-side
``lora_B`` and columns of the down-side ``lora_A`` (those columns start at 0), so ΔW = s·B·A touches
exactly the allowed rows/columns.

Deviations:
- Only feed-forward neurons: the paper also scores attention Q/K/V neurons (``top_number_attn = 1000``),
  whose PLND score needs the reference's modified attention forward; not done here.
- ``top_fraction`` = 2000/14336 (the reference's top-2000 of Llama-3-8B's 14336 neurons) scales the top-k
  to any width (the organism's 384 → 54).
- Corpora: the harmful prompts are the alignment set's refusal prompts (the paper: AdvBench-style
  harmful queries), the general prompts its other prompts (the paper: general text); ``samples`` each.
- The tuning data is the stage's alignment set (the paper: a small safety corpus, 1 epoch, lr 1e-6), with
  the run's ``align.*`` settings. A masked weight keeps its value only with ``weight_decay = 0`` (the
  default): decoupled weight decay would still shrink it.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..bounds import bounds
from ..models.introspect import mlp_modules
from .base import Context, Defense, upcast

log = logging.getLogger(__name__)


@dataclass
class Config:
    top_fraction: float = field(default=2000 / 14336, metadata=bounds(0.0, 1.0))  # top-k / layer width
    consistency: float = field(default=1.0, metadata=bounds(0.0, 1.0))  # share of documents (1: all)
    samples: int = field(default=200, metadata=bounds(1))  # documents per corpus
    protect: bool = False  # in user fine-tuning: freeze the RSN (the paper's second use)
    batch_size: int = field(default=16, metadata=bounds(1))  # scoring batch; does not change the result


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _base(m: nn.Module) -> nn.Module:
    """A PEFT-wrapped linear's original module, or the module itself."""
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def _linears(mlp: nn.Module) -> list[nn.Module]:
    """The block's linear layers in registration order (a PEFT-wrapped one as its wrapper)."""
    from peft.tuners.lora import LoraLayer

    kinds = _linear_types()
    out = []
    for name, m in mlp.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or parts[-1] == "base_layer":
            continue
        if isinstance(m, (LoraLayer, *kinds)):
            out.append(m)
    return out


def mlp_parts(mlp: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(up-side projections, down projection) of a feed-forward block: the down projection is its last
    linear, the up side every other linear whose output width is the down projection's input width."""
    lin = _linears(mlp)
    down = lin[-1]
    width = _in_out(_base(down))[0]
    ups = [m for m in lin[:-1] if _in_out(_base(m))[1] == width]
    if not ups:
        raise ValueError(f"{type(mlp).__name__}: no up-side projection of width {width} found")
    return ups, down


def _in_out(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    return (w.shape[1], w.shape[0]) if isinstance(m, nn.Linear) else (w.shape[0], w.shape[1])


def down_column_norms(down: nn.Module) -> torch.Tensor:
    """‖W_down[:, k]‖₂ for every neuron k."""
    m = _base(down)
    w = upcast(m.weight.detach())
    return w.norm(dim=0) if isinstance(m, nn.Linear) else w.norm(dim=1)


@torch.no_grad()
def importance(model: nn.Module, feats: list[dict], fmt: Any, batch_size: int) -> list[torch.Tensor]:
    """Per layer, (documents × neurons): ‖W_down[:, k]‖₂·‖a_k(x)‖₂ over each document's tokens."""
    downs = [mlp_parts(m)[1] for m in mlp_modules(model)]
    norms = [down_column_norms(d) for d in downs]
    acts: list[list[torch.Tensor]] = [[] for _ in downs]
    cur: dict[str, torch.Tensor] = {}

    def keep(i: int):
        def fn(_m, args):
            a = upcast(args[0]) * cur["mask"][..., None]
            acts[i].append(a.pow(2).sum(1).sqrt())
        return fn

    hooks = [_base(d).register_forward_pre_hook(keep(i)) for i, d in enumerate(downs)]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for k in range(0, len(feats), batch_size):
            b = fmt.collate(feats[k: k + batch_size])
            cur["mask"] = b["attention_mask"].to(device=device, dtype=norms[0].dtype)
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return [torch.cat(a) * n.to(a[0].device) for a, n in zip(acts, norms)]


def activated(scores: torch.Tensor, top_fraction: float, consistency: float) -> torch.Tensor:
    """Bool (neurons,): in the top ``top_fraction`` of the layer for at least ``consistency`` of the documents."""
    n = scores.shape[1]
    k = max(1, round(top_fraction * n))
    top = torch.zeros_like(scores, dtype=torch.bool)
    top.scatter_(1, scores.topk(k, dim=1).indices, True)
    share = top.double().mean(0)
    return share >= consistency - 1e-12


def corpora(ctx: Context, samples: int, seed: int) -> tuple[list[str], list[str]]:
    """(harmful prompts, general prompts) from the alignment set."""
    align = ctx.data.get("alignment", [])
    harmful = [ex.prompt for ex in align if ex.kind == "refusal"]
    general = [ex.prompt for ex in align if ex.kind != "refusal"]
    if not harmful or not general:
        raise ValueError("rsn-tune: needs harmful (refusal) and general prompts in the alignment set to find "
                         "safety neurons")
    rng = random.Random(seed)
    pick = (lambda xs: rng.sample(xs, samples) if len(xs) > samples else xs)  # noqa: E731
    return pick(harmful), pick(general)


def robust_safety_neurons(model: nn.Module, ctx: Context, cfg: Config) -> list[torch.Tensor]:
    """Per layer, bool (neurons,): N_safe − N_found on ``model``."""
    fmt = ctx.formatter
    harmful, general = corpora(ctx, cfg.samples, ctx.seed)
    enc = (lambda ps: [{"input_ids": fmt.prompt_ids(p), "labels": fmt.prompt_ids(p)} for p in ps])  # noqa: E731
    safe = [activated(s, cfg.top_fraction, cfg.consistency) for s in importance(model, enc(harmful), fmt, cfg.batch_size)]
    found = [activated(s, cfg.top_fraction, cfg.consistency) for s in importance(model, enc(general), fmt, cfg.batch_size)]
    rsn = [s & ~f for s, f in zip(safe, found)]
    ctx.state["rsn"] = {"safety": [int(s.sum()) for s in safe], "foundation": [int(f.sum()) for f in found],
                        "rsn": [int(r.sum()) for r in rsn],
                        "neurons": [r.nonzero().flatten().tolist() for r in rsn]}
    log.info("rsn-tune: safety neurons %s, foundation %s, robust safety neurons %s per layer",
             ctx.state["rsn"]["safety"], ctx.state["rsn"]["foundation"], ctx.state["rsn"]["rsn"])
    return rsn


def neuron_masks(model: nn.Module, neurons: list[torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor, bool]]:
    """(parameter, mask, is a down-side ``lora_A``) with mask 1 on the entries neuron k owns, for the set ``neurons`` (per layer).

    Plain weights: rows of the up side (and their bias entries), columns of the down projection. LoRA
    layers: the same rows of the up side's ``lora_B``, the same columns of the down side's ``lora_A``.
    """
    out = []
    for mlp, sel in zip(mlp_modules(model), neurons):
        ups, down = mlp_parts(mlp)
        for m, role in [(u, "up") for u in ups] + [(down, "down")]:
            base = _base(m)
            conv = not isinstance(base, nn.Linear)  # Conv1D stores (in, out)
            if hasattr(m, "lora_A"):  # PEFT LoRA layer: the adapter carries the update
                for name in m.active_adapters:
                    if role == "up":
                        p = m.lora_B[name].weight  # (out, r)
                        out.append((p, sel.to(p.device)[:, None].expand_as(p).to(p.dtype), False))
                    else:
                        p = m.lora_A[name].weight  # (r, in)
                        out.append((p, sel.to(p.device)[None, :].expand_as(p).to(p.dtype), True))
                continue
            w = base.weight
            if role == "up":
                mask = sel[None, :].expand_as(w) if conv else sel[:, None].expand_as(w)
                if getattr(base, "bias", None) is not None:
                    out.append((base.bias, sel.to(base.bias.dtype), False))
            else:
                mask = sel[:, None].expand_as(w) if conv else sel[None, :].expand_as(w)
            out.append((w, mask.to(w.device, w.dtype), False))
    return out


class RSNTune(Defense):
    """Align by tuning only the robust safety neurons; optionally keep them frozen in fine-tuning."""

    name = "rsn-tune"
    needs = ("alignment",)
    Config = Config

    def acts_in(self, stage: str) -> bool:
        return stage == "align" or (stage == "finetune" and self.cfg.protect)

    def setup(self, model: nn.Module, ctx: Context) -> None:
        rsn = robust_safety_neurons(model, ctx, self.cfg)
        total = sum(int(r.sum()) for r in rsn)
        self._hooks = []
        if ctx.stage == "align":
            if total == 0:
                raise ValueError("rsn-tune: no robust safety neuron found (safety neurons all shared with general "
                                 "prompts); lower defense.top_fraction or defense.consistency")
            masks = neuron_masks(model, rsn)
            keep = {id(p) for p, _, _ in masks}
            for p in model.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)
            if not any(p.requires_grad for p, _, _ in masks):
                raise ValueError("rsn-tune: no trainable MLP weight (under LoRA, add the MLP projections to "
                                 "align.lora_targets)")
        else:
            masks = [(p, 1 - m, a) for p, m, a in neuron_masks(model, rsn)]  # protect: the RSN get a zero mask
        with torch.no_grad():
            for p, m, lora_a in masks:
                if p.requires_grad and lora_a:
                    p.mul_(m)  # a down-side lora_A column outside the allowed set starts (and stays) at 0
        for p, m, _ in masks:
            if p.requires_grad:
                self._hooks.append(p.register_hook(lambda g, m=m: g * m))
        log.info("rsn-tune (%s): %d robust safety neurons %s", ctx.stage,
                 total, "tuned" if ctx.stage == "align" else "frozen")

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []

