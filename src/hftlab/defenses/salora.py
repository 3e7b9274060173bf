"""SaLoRA: a fixed safety module that keeps LoRA's update off the aligned model's safety features.

Paper: Li, Si, Backes, Zhang, Wang, "SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation", ICLR 2025,
arXiv 2501.01765.
Reference: homles11/SaLoRA @ 3f73de1, ``lora_train_act.py`` (safety and task features, ``lora_C``, the
initial ``lora_A``/``lora_B`` and the residual base weight), ``process_lora.py`` (``lora_B ← lora_C·lora_B``
after training) and its modified ``peft/tuners/lora/layer.py`` (``lora_C`` next to A and B).

Per adapted linear W (out × in), on the aligned model:

- safety features F_s = X_s·Wᵀ, X_s the layer's inputs at the response tokens of ``samples`` safety
  examples (harmful prompt + the aligned refusal); V_s = the top ``safety_rank`` right singular vectors
  of F_s (out × r_s); the fixed safety module C = I − V_s·V_sᵀ;
- task-specific initialisation: F_t = X_t·Wᵀ on ``samples`` of the user's fine-tuning data, V_t its top
  ``task_rank`` right singular vectors; W = U·S·Vᵀ (top r = the LoRA rank); B₀ = V_t·V_tᵀ·U_r·√(S_r/s),
  A₀ = √(S_r/s)·V_rᵀ (s = LoRA scaling);
- the layer computes W·x + s·C·B·A·x − s·C·B₀·A₀·x: the model is unchanged at the start (the reference
  folds −C·B₀·A₀ into the frozen W) and every update ΔW = s·C·(B·A − B₀·A₀) has V_sᵀ·ΔW = 0, so the
  safety features F_s·V_s of the aligned model stay where they were.

C acts through a forward hook on ``lora_B`` during training and is folded into B at the end (B ← C·B, as
``process_lora.py`` does), so the saved merged model is W + s·C·(B·A − B₀·A₀).

Deviations:
- The fixed term −s·C·B₀·A₀ is a second, frozen LoRA adapter (``salora_residual``: B = −C·B₀, A = A₀)
  instead of an edit of W: the base weights stay bit-identical (the pipeline's contract) and the merged
  model is the same.
- Ranks scale with the layer's width: r_s = max(1, round(``safety_fraction`` · out)), r_t likewise with
  ``task_fraction``; the defaults 32/4096 are the reference's rs = ds = 32 on Llama-2-7B's 4096-wide
  q/v projections (the organism's 128-wide q/k/v get 1). ``safety_rank`` / ``task_rank`` > 0 set them.
- Exact SVD (``torch.linalg.svd``) instead of ``torch.svd_lowrank(niter=30)``.
- The reference uses LoRA scaling 1 (α = r); with another scaling, S_r/s keeps s·B₀·A₀ the same (as
  PEFT's PiSSA initialisation does).
- Safety data: the provider's alignment set's refusal examples (the reference: 128 harmful prompts with
  the aligned Llama-2-chat answers); task data: the user's upload (the reference: 128 Alpaca samples),
  harmful samples included, since that is all the provider has.
- LoRA only (the method is an adapter): full fine-tuning is a one-line error.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..bounds import bounds
from ..data.format import IGNORE
from ._weights import lora_layers
from .base import Context, Defense, upcast

log = logging.getLogger(__name__)

RESIDUAL = "salora_residual"


@dataclass
class Config:
    safety_fraction: float = field(default=32 / 4096, metadata=bounds(0.0, 1.0))  # r_s / out (reference 32/4096)
    task_fraction: float = field(default=32 / 4096, metadata=bounds(0.0, 1.0))  # r_t / out (reference 32/4096)
    safety_rank: int = field(default=0, metadata=bounds(0))  # > 0: r_s itself
    task_rank: int = field(default=0, metadata=bounds(0))  # > 0: r_t itself
    samples: int = field(default=128, metadata=bounds(1))  # examples per feature set (reference nsamples=128)
    batch_size: int = field(default=16, metadata=bounds(1))  # feature pass batch; does not change the result


def rank_of(fraction: float, fixed: int, width: int) -> int:
    """A subspace rank: ``fixed`` if > 0, else max(1, round(fraction · width)), at most ``width``."""
    r = fixed or max(1, round(fraction * width))
    return min(r, width)


def top_right_vectors(features: torch.Tensor, rank: int) -> torch.Tensor:
    """(out, rank): the top right singular vectors of ``features`` (tokens × out)."""
    _, _, vh = torch.linalg.svd(features, full_matrices=False)
    return vh[:rank].T


def safety_module(v_s: torch.Tensor) -> torch.Tensor:
    """C = I − V_s·V_sᵀ."""
    return torch.eye(v_s.shape[0], dtype=v_s.dtype, device=v_s.device) - v_s @ v_s.T


def task_init(weight: torch.Tensor, v_t: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B₀, A₀) = (V_t·V_tᵀ·U_r·√(S_r/s), √(S_r/s)·V_rᵀ) for ``weight`` (out × in) = U·S·Vᵀ."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return v_t @ (v_t.T @ u[:, :r]) * root, root[:, None] * vh[:r]


def base_weight(layer: Any) -> torch.Tensor:
    """The LoRA layer's frozen weight, (out, in) (GPT-2's Conv1D stores it transposed)."""
    w = layer.get_base_layer().weight.detach()
    return w.T if getattr(layer, "fan_in_fan_out", False) else w


def sample_examples(data: list, n: int, seed: int) -> list:
    rng = random.Random(seed)
    return rng.sample(data, n) if len(data) > n else list(data)


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: dict[str, Any], feats: list[dict], pad_id: int,
                 batch_size: int, fmt: Any) -> dict[str, torch.Tensor]:
    """Each LoRA layer's input at the labelled (response) tokens, (tokens × in), in the weights' precision."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    mask: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def fn(_m, args):
            x = args[0]
            got[name].append(upcast(x[mask["m"]]).detach())
        return fn

    hooks = [layer.get_base_layer().register_forward_pre_hook(keep(name)) for name, layer in layers.items()]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(feats), batch_size):
            b = fmt.collate(feats[i: i + batch_size])
            mask["m"] = (b["labels"] != IGNORE).to(device)
            model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {name: torch.cat(xs) for name, xs in got.items()}


def safety_examples(ctx: Context) -> list:
    """Harmful prompts with the aligned model's refusal: the alignment set's refusal rows."""
    rows = [ex for ex in ctx.data.get("alignment", []) if ex.kind == "refusal"]
    if not rows:
        raise ValueError("salora: needs refusal examples in the alignment set to find the safety features")
    return rows


class SaLoRA(Defense):
    """LoRA whose update is projected off the safety feature subspace, with a task-specific start."""

    name = "salora"
    needs = ("alignment",)
    # run settings it is defined for (checked when a config is built: `hftlab validate` names the key)
    requires = {"finetune.lora": True}
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        layers = lora_layers(model)
        if not layers:
            raise ValueError("salora: needs LoRA fine-tuning (finetune.lora=true); it is defined on the adapter")
        fmt = ctx.formatter
        pad = fmt.tok.pad_token_id
        cfg = self.cfg
        safe = fmt.encode_all(sample_examples(safety_examples(ctx), cfg.samples, ctx.seed))
        task = fmt.encode_all(sample_examples(ctx.data.get("user", []), cfg.samples, ctx.seed + 1))
        if not task:
            raise ValueError("salora: no user data to compute the task-specific initialisation")
        x_safe = layer_inputs(model, layers, safe, pad, cfg.batch_size, fmt)
        x_task = layer_inputs(model, layers, task, pad, cfg.batch_size, fmt)
        peft = _peft_model(model)
        adapter = next(iter(layers.values())).active_adapters[0]
        peft.add_adapter(RESIDUAL, peft.peft_config[adapter])
        self._hooks, self._modules = [], {}
        for name, layer in layers.items():
            w = upcast(base_weight(layer))
            out = w.shape[0]
            v_s = top_right_vectors(x_safe[name] @ w.T, rank_of(cfg.safety_fraction, cfg.safety_rank, out))
            v_t = top_right_vectors(x_task[name] @ w.T, rank_of(cfg.task_fraction, cfg.task_rank, out))
            c = safety_module(v_s)
            s = float(layer.scaling[adapter])
            b0, a0 = task_init(w, v_t, layer.r[adapter], s)
            with torch.no_grad():
                lb, la = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
                lb.copy_(b0.to(lb.dtype))
                la.copy_(a0.to(la.dtype))
                rb, ra = layer.lora_B[RESIDUAL].weight, layer.lora_A[RESIDUAL].weight
                rb.copy_((-(c @ b0)).to(rb.dtype))
                ra.copy_(a0.to(ra.dtype))
            self._modules[name] = (layer.lora_B[adapter], c.to(lb.dtype))
            self._hooks.append(layer.lora_B[adapter].register_forward_hook(_project(c.to(lb.dtype))))
            ctx.state.setdefault("salora", {})[name] = {"safety_rank": v_s.shape[1], "task_rank": v_t.shape[1]}
        _activate(peft, [adapter, RESIDUAL])
        log.info("salora: %d LoRA layers, safety rank %s", len(layers),
                 sorted({v["safety_rank"] for v in ctx.state["salora"].values()}))

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        """Fold C into B (B ← C·B) and remove the hooks: the merged model is then W + s·C·(B·A − B₀·A₀)."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        with torch.no_grad():
            for lin, c in getattr(self, "_modules", {}).values():
                lin.weight.copy_(c @ lin.weight)
        self._hooks, self._modules = [], {}


def _project(c: torch.Tensor):
    def fn(_m, _args, out):
        return out @ c  # C is symmetric: (C·y)ᵀ = yᵀ·C
    return fn


def _peft_model(model: nn.Module) -> Any:
    """The PeftModel (through DDP's ``module``)."""
    from peft import PeftModel

    m = model
    while not isinstance(m, PeftModel):
        if not (hasattr(m, "module") and isinstance(m.module, nn.Module)):
            raise ValueError("salora: needs a PEFT LoRA model (finetune.lora=true)")
        m = m.module
    return m


def _activate(peft: Any, adapters: list[str]) -> None:
    """Both adapters active in every LoRA layer (the merge then adds both); only the first trains."""
    peft.base_model.set_adapter(adapters)
    for name, p in peft.named_parameters():
        p.requires_grad_(f".{adapters[0]}." in name and "lora_" in name)
