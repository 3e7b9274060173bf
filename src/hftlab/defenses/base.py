"""The defense protocol and the context a method may use.

A defense acts in the stage its registry entry names (``Defense.stages`` reads it) and overrides only the
hooks it needs:

- ``prepare_data(stage, data, ctx)``: data-level methods (SafeInstr, BEA, …) edit the Examples;
- ``setup(model, ctx)``: before the optimiser is built (freeze layers, add hooks, frozen copies);
- ``backward(model, batch, ctx) -> loss``: gradients for one micro-batch. Multi-pass methods live here,
  so the loop stays one loop; accumulate into ``.grad`` via ``ctx.accelerator.backward`` and never zero
  it (gradient accumulation, clipping and mixed precision stay in the loop);
- ``on_step_end(model, ctx)``: after each optimiser step (schedules, state switches);
- ``repair(model, ctx) -> model``: weight edits after fine-tuning;
- ``system_prompt(stage)``: a system prompt for training/serving (PTST, BEA).

In a stage the defense does not act in, the loop uses the plain SFT behaviour.
"""
from __future__ import annotations

import importlib
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..data.example import Example
from ..training.loss import (SPLIT_OVERHEAD, batch_pieces, label_count, length_groups,  # noqa: F401
                             lm_loss, paired_logits, paired_mean, paired_outputs, piece_loss, pieces_of,
                             row_groups)  # the loss and its length grouping: defenses import them from here too


@dataclass
class Context:
    """What a method may ask for during a stage. Built by the pipeline; tests build it directly."""

    stage: str
    accelerator: Any = None
    formatter: Any = None
    train_cfg: Any = None
    seed: int = 0
    step: int = 0  # optimiser steps done so far in this stage
    total_steps: int = 0
    micro_step: int = 0
    data: dict[str, list[Example]] = field(default_factory=dict)  # "alignment", "harmful", "user"
    loaders: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)  # "aligned", "base"
    batch_size: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # a defense's own scratch space
    # the repair stage's contract: the pipeline gives the fine-tune stage's folder (its LoRA adapter, if
    # any, is ``<finetuned_path>/adapter``); the defense gives its metrics for the stage's manifest
    finetuned_path: str = ""
    repair_metrics: dict[str, Any] = field(default_factory=dict)
    # scalars a defense reports for the current optimiser step (tensors may stay on the device); the loop
    # writes them next to the loss in ``losses.jsonl`` and clears them after each step
    step_metrics: dict[str, Any] = field(default_factory=dict)
    _refs: dict[str, nn.Module] = field(default_factory=dict)
    _iters: dict[str, Iterator[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return bool(self.data.get(name))

    def reference(self, name: str) -> nn.Module:
        """A frozen model ('aligned' or 'base'), loaded once, in eval mode, without gradients."""
        if name not in self._refs:
            if name not in self.loaders:
                raise KeyError(f"no '{name}' reference model in stage '{self.stage}'")
            ref = self.loaders[name]()
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._refs[name] = ref
        return self._refs[name]

    def batches(self, name: str, batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """An endless, seeded, shuffled iterator of training batches of ``data[name]`` on the device."""
        key = f"{name}:{batch_size}"
        if key not in self._iters:
            if not self.has(name):
                raise KeyError(f"stage '{self.stage}' has no '{name}' data")
            feats = self.formatter.encode_all(self.data[name])
            bs = batch_size or self.batch_size or 8
            device = self.device
            self._iters[key] = ({k: v.to(device) for k, v in b.items()}
                                for b in endless_batches(feats, bs, self.formatter.collate, self.seed + len(key)))
        return self._iters[key]

    def next_batch(self, name: str, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        return next(self.batches(name, batch_size))

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        return torch.device("cpu")

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()


def endless_batches(feats: Sequence[dict], per_device: int, collate: Callable[[list], dict[str, torch.Tensor]],
                    seed: int, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of ``per_device`` rows (a new seeded shuffle each epoch, a short last batch
    dropped unless it is the only one); process ``rank`` of ``world`` takes its shard of each global batch.
    The training loop's micro-batches and :meth:`Context.batches` both come from here."""
    shuffler = random.Random(seed)
    global_bs = per_device * world
    while True:
        order = list(range(len(feats)))
        shuffler.shuffle(order)
        for i in range(0, max(1, len(order) - global_bs + 1), global_bs):
            chunk = order[i: i + global_bs][rank * per_device: (rank + 1) * per_device]
            if chunk:
                yield collate([feats[j] for j in chunk])


def local_model(model: nn.Module) -> nn.Module:
    """``model`` without a DDP wrapper: extra passes must not trigger DDP's gradient all-reduce. (PEFT's
    wrapper stays: :func:`hftlab.models.introspect.unwrap` is the one that also removes it.)"""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def grads_of(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """∂loss/∂p for each of ``params`` via ``torch.autograd.grad`` (``.grad`` untouched), zeros where unused."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def linear_term(params: Sequence[nn.Parameter], vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ⟨v, p⟩ with v constant: its gradient w.r.t. each p is exactly v (adds v to ``.grad`` via backward)."""
    return sum((v.detach() * p).sum() for p, v in zip(params, vectors))


@contextmanager
def weights_moved(params: Sequence[nn.Parameter], deltas: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block each p is p + delta (``deltas`` may be a generator: consumed one at a time); on
    exit, even on an error, every p is restored bit for bit from a copy."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a half-precision float, else as it is (float32 and float64 unchanged,
    so a defense's arithmetic keeps a float64 model's precision; the gradient tests run in float64)."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


class _RegisteredStages:
    """``Defense.stages``: the stages of the class's registry entry (:func:`hftlab.registry.defense_stages`),
    where a defense's stage is written once. A class that is not registered (a test's) may set its own."""

    def __get__(self, obj: Any, cls: type) -> tuple[str, ...]:
        # imported by name: the registry lists every plugin, so it stays out of each defense's code
        # fingerprint (code_identity), and registering a new plugin recomputes no stage
        return importlib.import_module("hftlab.registry").defense_stages(cls)


class Defense:
    """Base class: plain SFT behaviour in every hook. Subclasses set a ``Config``; their stage is their
    registry entry's (``stages``)."""

    name: ClassVar[str] = "sft"
    stages: ClassVar[tuple[str, ...]] = _RegisteredStages()  # type: ignore[assignment]
    needs: ClassVar[tuple[str, ...]] = ()  # data or references required: "harmful", "alignment", "aligned", "base"
    Config: ClassVar[type | None] = None
    data_source: Any = None  # the run's data source (bind_data); None: the organism's

    def __init__(self, cfg: Any = None, **params: Any):
        if cfg is None and self.Config is not None:
            cfg = self.Config(**params)
            check = getattr(cfg, "check", None)
            if check:
                check()
        self.cfg = cfg

    def acts_in(self, stage: str) -> bool:
        return stage in self.stages

    def bind_data(self, source: Any) -> None:
        """Keep the run's data source (the pipeline calls this first): a defense whose defaults are the
        data's own text (PTST's serving prompt, BEA's trigger words) asks it, never the organism."""
        self.data_source = source

    def prepare_data(self, stage: str, data: list[Example], ctx: Context) -> list[Example]:
        return data

    def setup(self, model: nn.Module, ctx: Context) -> None:
        pass

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        loss = lm_loss(model, batch)
        ctx.backward(loss)
        return loss.detach()

    def on_step_end(self, model: nn.Module, ctx: Context) -> None:
        pass

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        """After the stage's last step (remove hooks, restore flags)."""

    def repair(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model

    def system_prompt(self, stage: str) -> str:
        """System prompt added to this stage's examples ('serve' = evaluation); '' for none."""
        return ""


PLAIN = Defense()
