"""T-Vaccine: Vaccine on a sampled subset of safety-critical layers (less memory).

Paper: Liu, Lin, Huang, Mo, Mu, Shen — "Targeted Vaccine: Safety Alignment for Large Language Models
against Harmful Fine-Tuning via Layer-wise Perturbation", arXiv 2410.09760.
Reference: Lslland/T-Vaccine ``trainer.py`` (``BaseTrainer.training_step``, ``switch_active_layers``,
``after_gradient_magnitude_step``, ``unfreeze_activate_layers``) and ``models/modeling_llama_my.py``
(non-sampled layers run under gradient checkpointing), checked against them; defaults from
``script/alignment/T-Vaccine.sh`` (S=8, J=20, K=200) and the README (ρ=3).

Every K optimiser steps, score each layer l by ‖∂h/∂(attention output_l)‖₂ on a harmful batch
(h = harmful loss); every J steps, sample S layers without replacement with probability
score_l / Σ score. Only the sampled layers' attention modules are trainable and only their attention
outputs get Vaccine's perturbation (one global norm ρ over the sampled layers); the other layers'
attention is frozen and those layers run under gradient checkpointing, which is where the memory goes
down. Everything outside the attention modules (MLPs, norms, embeddings) trains as in SFT: the
reference toggles only parameters inside the attention modules (``unfreeze_activate_layers``), while
its LoRA on the MLP projections (``train.py``: q,k,v,o,up,down,gate) trains in every layer.

Scaling S: the paper samples S=8 of Llama-2-7B's 32 layers. ``layers`` is that S and ``paper_depth``
that 32: on an L-layer model S is rescaled to max(1, round(S·L/32)), the same fraction of the
depth (1 of the organism's 4 layers). ``paper_depth=0`` takes ``layers`` literally (capped at L).
``rho_batch`` works as in Vaccine (``perturbation.effective_rho``): the reference's ρ = 3 was set at a
micro-batch of 10; ``rho_batch=10`` keeps each example's perturbation at that scale for any batch.

Deviations:
- With full fine-tuning (the organism's alignment), "the attention LoRA of a layer" becomes the
  attention module's weights; the rest trains in every layer, as the reference's MLP LoRA does.
- The schedule runs on optimiser steps (``on_step_end``), not on Trainer micro-steps (the reference
  re-scores/re-samples on every micro-batch of a scheduled step under gradient accumulation).
- Sampling uses a torch generator seeded by the run's seed (the reference uses global NumPy).
- Scoring and pass 1 use ``torch.autograd.grad`` w.r.t. attention outputs only (no weight gradients).
- The reference's extra un-checkpointed layer i−1 for models deeper than 26 layers only saves
  recomputation; here only the sampled layers skip checkpointing. Checkpointing uses HF's per-layer
  switch (``GradientCheckpointingLayer``; the KV cache is turned off for the stage); a layer class
  without it runs normally (then only the frozen weights save memory).
- Scoring batches (``score_batch_size``, reference 1) come from the provider's harmful set (the
  reference: the first 200 unsafe samples of its alignment file).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..bounds import bounds
from ..models.introspect import attention_modules, decoder_layers, unwrap
from .base import Context, Defense
from .perturbation import effective_rho, global_norm, local_model, output_grads, require, vaccine_backward

log = logging.getLogger(__name__)


@dataclass
class Config:
    rho: float = field(default=3.0, metadata=bounds(0.0, None))  # perturbation radius ρ (README: 3)
    rho_batch: int = field(default=0, metadata=bounds(0))  # 0: ρ per micro-batch (reference); B_ref: ρ·√(B/B_ref)
    layers: int = field(default=8, metadata=bounds(1))  # S, sampled layers (paper: 8 of 32)
    paper_depth: int = field(default=32, metadata=bounds(0))  # depth S refers to; 0 = take S as is
    interval: int = field(default=20, metadata=bounds(1))  # J, steps between samplings
    score_interval: int = field(default=200, metadata=bounds(1))  # K, steps between layer scorings
    score_batch_size: int = field(default=1, metadata=bounds(1))  # harmful samples per scoring (reference: 1)
    checkpoint_frozen: bool = True  # gradient checkpointing on the non-sampled layers (reference)

    def check(self) -> None:
        if self.rho < 0:
            raise ValueError(f"rho: {self.rho} < 0; the perturbation radius must be >= 0")


def sampled_count(cfg: Config, depth: int) -> int:
    """S on a ``depth``-layer model: the paper's fraction S/paper_depth of the layers, at least 1."""
    s = round(cfg.layers * depth / cfg.paper_depth) if cfg.paper_depth else cfg.layers
    return max(1, min(depth, s))


def layer_scores(model: nn.Module, batch: dict[str, torch.Tensor], attns: list[nn.Module]) -> torch.Tensor:
    """‖∂h/∂(attention output_l)‖₂ for every layer l on one harmful batch."""
    _, grads = output_grads(local_model(model), batch, attns)
    return torch.stack([global_norm([g]) for g in grads])


def layer_probabilities(scores: torch.Tensor) -> torch.Tensor:
    total = scores.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(scores, 1.0 / len(scores))
    return scores / total


def sample_layers(probs: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k distinct layers, drawn one after another in proportion to ``probs`` (as numpy's choice); drawn on
    the CPU with the CPU ``generator``, so a GPU run samples the same layers as a CPU run."""
    probs = probs.detach().float().cpu().clamp_min(1e-12)  # a zero score must not make k distinct draws impossible
    return sorted(torch.multinomial(probs, k, replacement=False, generator=generator).tolist())


class TVaccine(Defense):
    """Vaccine on S layers sampled by harmful-gradient norm; the other layers' attention is frozen."""

    name = "t-vaccine"
    needs = ("harmful",)
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        require(ctx, "harmful", "t-vaccine")
        self.layers = decoder_layers(model)
        self.attns = attention_modules(model)
        self.owned = [[p for p in attn.parameters() if p.requires_grad] for attn in self.attns]
        self.ckpt = [(getattr(l, "gradient_checkpointing", None), getattr(l, "_gradient_checkpointing_func", None))
                     for l in self.layers]
        self.config = getattr(unwrap(model), "config", None)
        self.use_cache = getattr(self.config, "use_cache", None)
        if self.cfg.checkpoint_frozen and self.use_cache:  # a checkpointed layer must not write a KV cache
            self.config.use_cache = False
        self.k = sampled_count(self.cfg, len(self.layers))
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.active: list[int] = []
        self.probs = torch.full((len(self.layers),), 1.0 / len(self.layers))
        self._schedule(model, ctx)

    def _schedule(self, model: nn.Module, ctx: Context) -> None:
        cfg = self.cfg
        if ctx.step % cfg.score_interval == 0:
            self._restore_checkpointing()
            batch = ctx.next_batch("harmful", cfg.score_batch_size)
            self.probs = layer_probabilities(layer_scores(model, batch, self.attns))
            log.debug("t-vaccine step %d: layer probabilities %s", ctx.step, self.probs.tolist())
        if ctx.step % cfg.interval == 0:
            self.active = sample_layers(self.probs, self.k, self.generator)
            self._activate()
            log.debug("t-vaccine step %d: active layers %s", ctx.step, self.active)

    def _activate(self) -> None:
        for i, (layer, params) in enumerate(zip(self.layers, self.owned)):
            on = i in self.active
            for p in params:
                p.requires_grad_(on)
            if self.cfg.checkpoint_frozen and self.ckpt[i][0] is False:  # an HF checkpointable layer
                layer.gradient_checkpointing = not on
                layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def _restore_checkpointing(self) -> None:
        for layer, (flag, func) in zip(self.layers, self.ckpt):
            if flag is not None:
                layer.gradient_checkpointing = flag
                layer._gradient_checkpointing_func = func

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        rho = effective_rho(self.cfg.rho, self.cfg.rho_batch, batch["input_ids"].shape[0])
        return vaccine_backward(model, batch, ctx, [self.attns[i] for i in self.active], rho)

    def on_step_end(self, model: nn.Module, ctx: Context) -> None:
        if ctx.step < ctx.total_steps:
            self._schedule(model, ctx)

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        self._restore_checkpointing()
        if self.use_cache:
            self.config.use_cache = self.use_cache
        for p in [p for params in self.owned for p in params]:
            p.requires_grad_(True)
        self.layers, self.attns, self.owned = [], [], []
