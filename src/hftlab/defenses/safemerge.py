"""SafeMERGE: merge a safety LoRA into the fine-tuned layers that leave the alignment subspace.

Paper: Djuhera et al., "SafeMERGE: Preserving Safety Alignment in Fine-Tuned Large Language Models via
Selective Layer-Wise Model Merging", arXiv 2503.17239.
Reference: aladinD/SafeMERGE @ 2af08c1: ``utils.py`` (``compute_safelora_projection_matrices``,
``compute_safelora_cos``, ``SafeLoRAMerger.add_weighted_adapter_safelora``) and
``get_safemerge_model.py`` (``cos_threshold=0.35``, ``weighting=[0.8, 0.2]``, ``merge_type=linear``).

Per fine-tuned linear weight: Safe LoRA's C = V·Vᵀ/‖V‖_F with V = W_aligned − W_base, and
cos = cos(C·ΔW_ft, ΔW_ft) (see safelora.py). Layers with cos < τ (strict, as the reference) are merged
with weights [w_ft, w_safe]; the others keep ΔW_ft (the reference's [1, 0]). ``merge="linear"``
(default) is the reference's per-layer PEFT ``linear`` combination of the factors,
A = Σ√(w_i·s_i)·A_i, B = Σ√(w_i·s_i)·B_i, ΔW = B·A (cross terms B_ft·A_safe, B_safe·A_ft included);
it needs the fine-tuning LoRA (a PEFT model, or the adapter the fine-tune stage saved) and equal ranks.
``merge="cat"`` combines the updates, w_ft·ΔW_ft + w_safe·ΔW_safe (PEFT's ``cat``); it is also the
fallback when only a merged model exists.

The safety adapter. Reference: a LoRA fine-tuned from the aligned chat model on a public safety set
(harmful prompts with safe answers; the paper uses 100–2500 samples), loaded as a second adapter.
Organism equivalent used here: a LoRA trained from the aligned model on the refusal examples (harmful
prompt → refusal) of the provider's alignment set (``safety_n`` of them), on the linear weights the
fine-tuning changed, with the pipeline's fine-tuning recipe (r 8, α 16, lr 1e-3, 2 epochs, batch 16).
It is task-agnostic; it is retrained at each repair (seconds on the organism), seeded by ctx.seed.

Which layers. τ = 0.35 is a cosine measured on 7B-wide layers; the cosine of an update with the
alignment subspace depends on the layers' width and the update's rank, and on the organism no layer
falls below it (the repair is then a no-op). ``select="number"`` merges the N layers with the lowest
cosine instead, N = ``num_layers`` or a ``fraction`` of the fine-tuned layers (Safe LoRA's reference
offers this "number" mode for the same reason; default fraction 10/64 as in safelora.py). The default
stays the paper's threshold.

Deviations:
- ``select="number"`` is not in the SafeMERGE reference (it is Safe LoRA's).
- The safety data are the organism's refusals, not a public safety set (see above), and the adapter is
  trained here, only when some layer is below τ.
- ``merge="cat"`` (and the fallback to it) is not in the reference.
- Layers are found by type, not by ``target_modules`` names; the output is a merged model.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds, one_of
from ._weights import finetuned_lora, lora_factors, lora_layers, plain, set_update, targets, updates
from .base import Context, Defense
from .safelora import layer_cosines

log = logging.getLogger(__name__)


@dataclass
class Config:
    select: str = field(default="threshold", metadata=one_of("threshold", "number"))
    threshold: float = field(default=0.35, metadata=bounds(-1.0, 1.0))  # select=threshold: merge where cos < τ
    fraction: float = field(default=10 / 64, metadata=bounds(0.0, 1.0))  # select=number: share of the layers
    num_layers: int = field(default=0, metadata=bounds(0))  # select=number: > 0 sets the count itself
    weights: list[float] = field(default_factory=lambda: [0.8, 0.2])  # [fine-tuned, safety]
    merge: str = field(default="linear", metadata=one_of("linear", "cat"))
    safety_n: int = field(default=1000, metadata=bounds(1))  # refusal samples for the safety adapter
    safety_epochs: float = field(default=2.0, metadata=bounds(0.0))
    safety_lr: float = field(default=1e-3, metadata=bounds(0.0, 10.0))
    safety_rank: int = field(default=8, metadata=bounds(1))
    safety_alpha: float = field(default=16.0, metadata=bounds(0.0))
    safety_batch_size: int = field(default=16, metadata=bounds(1))

    def check(self) -> None:
        if len(self.weights) != 2 or any(not 0.0 <= w <= 1.0 for w in self.weights):
            raise ValueError(f"weights: expected [fine-tuned, safety] in [0, 1], got {self.weights}")


def train_safety_adapter(aligned: nn.Module, names: list[str], ctx: Context, cfg: Config) -> nn.Module:
    """A PEFT LoRA on the targets ``names`` of a copy of the aligned model, trained on refusals."""
    from peft import LoraConfig, get_peft_model

    from ..config import TrainConfig
    from ..models.loading import peft_wrapping
    from ..training.loop import train

    data = [ex for ex in ctx.data.get("alignment", []) if ex.kind == "refusal"][: cfg.safety_n]
    if not data:
        raise KeyError("safemerge needs refusal examples in ctx.data['alignment'] to train its safety adapter")
    model = copy.deepcopy(aligned)
    full = {id(m): n for n, m in model.named_modules()}
    wanted = set(names)
    modules = [full[id(t.module)] for n, t in targets(model).items() if n in wanted]
    torch.manual_seed(ctx.seed)
    with peft_wrapping():  # without the FutureWarning peft causes in transformers 5
        model = get_peft_model(model, LoraConfig(r=cfg.safety_rank, lora_alpha=cfg.safety_alpha, lora_dropout=0.0,
                                                 target_modules=modules, bias="none", task_type="CAUSAL_LM"))
    tcfg = TrainConfig(lr=cfg.safety_lr, epochs=cfg.safety_epochs, batch_size=cfg.safety_batch_size, lora=True,
                       max_length=ctx.formatter.max_length)
    res = train(model, ctx.formatter.encode_all(data), tcfg, seed=ctx.seed, desc="safemerge safety adapter",
                pad_id=ctx.formatter.tok.pad_token_id)
    ctx.state["safety_adapter"] = {"examples": len(data), "steps": res.steps, "final_loss": res.losses[-1]}
    return model.eval()


def merged_layers(cosines: dict[str, float], cfg: Config) -> list[str]:
    """The layers to merge: cos < τ (the paper), or the N lowest cosines (ties by name), N =
    ``num_layers`` or max(1, round(``fraction`` · layers)) (Safe LoRA's "number" mode)."""
    if cfg.select == "threshold":
        return [n for n, c in cosines.items() if c < cfg.threshold]
    n = cfg.num_layers or (max(1, round(cfg.fraction * len(cosines))) if cfg.fraction else 0)
    return sorted(cosines, key=lambda k: (cosines[k], k))[:n]


def linear_merge(ft: tuple, safe: tuple, weights: list[float]) -> torch.Tensor:
    """PEFT's per-layer ``linear`` combination of two LoRA factor sets (A, B, s): ΔW = B·A."""
    a = b = 0
    for (fa, fb, s), w in zip((ft, safe), weights):
        c = math.sqrt(w * s)
        a, b = a + c * fa, b + c * fb
    return b @ a


class SafeMERGE(Defense):
    """Where cos(C·ΔW, ΔW) < τ: merge the fine-tuned update with a trained safety LoRA's, [0.8, 0.2]."""

    name = "safemerge"
    needs = ("alignment", "aligned", "base")
    Config = Config

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        ft_lora = finetuned_lora(model, ctx) if self.cfg.merge == "linear" else None
        ft = _factors(ft_lora)  # read before merging
        model = plain(model)
        aligned = ctx.reference("aligned")
        cosines = layer_cosines(model, aligned, ctx.reference("base"))
        below = merged_layers(cosines, self.cfg)
        safe_model = train_safety_adapter(aligned, list(cosines), ctx, self.cfg) if below else None
        safe = _factors(safe_model)
        linear = all(n in ft and n in safe and ft[n][0].shape[0] == safe[n][0].shape[0] for n in below) and bool(ft)
        if self.cfg.merge == "linear" and not linear and below:
            log.info("safemerge: no matching fine-tuning LoRA factors: merging the updates (cat) instead")
        safe_delta = {t.name: d for t, _, d in updates(plain(safe_model), aligned)} if safe_model else {}
        w_ft, w_safe = self.cfg.weights
        with torch.no_grad():
            for t, ref, d in updates(model, aligned):
                if t.name in below:
                    new = (linear_merge(ft[t.name], safe[t.name], self.cfg.weights) if linear
                           else w_ft * d + w_safe * safe_delta.get(t.name, torch.zeros_like(d)))
                    set_update(t, ref, new)
        ctx.repair_metrics = {"merged_layers": len(below), "layers": len(cosines), "merged": below,
                              "merge": ("linear" if linear else "cat") if below else None,
                              "min_cos": min(cosines.values(), default=None),
                              "safety_adapter": ctx.state.get("safety_adapter")}
        log.info("safemerge: merged %d of %d layers (%s)", len(below), len(cosines), self.cfg.select)
        return model


def _factors(peft_model: nn.Module | None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Copies of (A, B, s) per target of a PEFT model ({} for None)."""
    if peft_model is None:
        return {}
    out = {}
    for n, m in lora_layers(peft_model).items():
        a, b, s = lora_factors(m)
        out[n] = (a.detach().float().clone(), b.detach().float().clone(), s)
    return out
