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


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], by_length: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of the batch.

    On CPU (one process), a right-padded batch whose rows differ much in length runs as a few length
    groups, each padded only to its own longest row (:func:`batch_pieces`). The loss is the same sum
    over the same tokens divided by the same count, so its value and gradient are those of the padded
    batch (up to float rounding); only the padding compute goes. ``by_length=False`` keeps one forward.
    """
    pieces = batch_pieces(model, batch, by_length)
    n_items = label_count(batch) if len(pieces) > 1 else None
    return sum(piece_loss(model, p, n_items) for p in pieces)


def batch_pieces(model: nn.Module, batch: dict[str, torch.Tensor], by_length: bool = True) -> list[dict]:
    """The batch as its length groups (CPU, one process, right-padded, when it saves compute), else [batch]."""
    return pieces_of(batch, row_groups(model, batch, by_length))


def pieces_of(batch: dict[str, torch.Tensor], groups: list[tuple[torch.Tensor, int]] | None) -> list[dict]:
    """The batch cut into ``groups`` (from :func:`row_groups`), or [batch] when None."""
    if groups is None:
        return [batch]
    return [{k: v[rows, :width] for k, v in batch.items()} for rows, width in groups]


def row_groups(model: nn.Module, batch: dict[str, torch.Tensor],
               by_length: bool = True) -> list[tuple[torch.Tensor, int]] | None:
    """(rows, width) of each length group of :func:`batch_pieces`, or None when the batch stays whole."""
    if not (by_length and _may_split(model, batch["input_ids"])):
        return None
    return length_groups(batch["attention_mask"])


def paired_outputs(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor], with_loss: bool = False,
                   **kw: Any) -> Iterator[tuple[Any, Any, dict[str, torch.Tensor]]]:
    """(output, reference output, rows) of the batch under ``model`` and the frozen ``ref_model`` (no
    gradient), per length group on CPU as in :func:`lm_loss` (else the whole batch once): sum over what it
    yields. ``with_loss``: the output's ``loss`` is those rows' share of the batch's mean loss (summing
    them gives the batch's). ``kw`` goes to both forwards (e.g. ``output_hidden_states=True``)."""
    pieces = batch_pieces(model, batch)
    share = {"num_items_in_batch": label_count(batch)} if with_loss and len(pieces) > 1 else {}
    for piece in pieces:
        inputs = {"input_ids": piece["input_ids"], "attention_mask": piece["attention_mask"], **kw, "use_cache": False}
        out = model(**inputs, labels=piece["labels"], **share) if with_loss else model(**inputs)
        with torch.no_grad():
            ref = ref_model(**inputs)
        yield out, ref, piece


def paired_logits(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits, reference logits, labels) of :func:`paired_outputs`: sum a per-token quantity over them."""
    for out, ref, rows in paired_outputs(model, ref_model, batch):
        yield out.logits, ref.logits, rows["labels"]


def paired_mean(model: nn.Module, ref_model: nn.Module, batch: dict[str, torch.Tensor],
                token_sum: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ ``token_sum(logits, ref_logits, labels)`` over :func:`paired_logits`, divided by the batch's number of
    labelled positions: the mean of a per-token quantity against a frozen reference (KL, SafeGrad)."""
    total = torch.zeros((), device=batch["input_ids"].device)
    for logits, ref_logits, labels in paired_logits(model, ref_model, batch):
        total = total + token_sum(logits, ref_logits, labels)
    return total / label_count(batch).clamp(min=1)


def label_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of predicted (shifted, labelled) tokens: the denominator of the batch's mean loss."""
    return (batch["labels"][:, 1:] != -100).sum()


def piece_loss(model: nn.Module, piece: dict[str, torch.Tensor], n_items: torch.Tensor | None) -> torch.Tensor:
    """Sum of the piece's token losses / ``n_items`` (the whole batch's count); the mean if None."""
    kw = {"num_items_in_batch": n_items} if n_items is not None else {}
    return model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], labels=piece["labels"],
                 **kw).loss


SPLIT_OVERHEAD = 96  # cost of one extra forward, in padded token positions (measured on the organism, CPU)


def _may_split(model: nn.Module, ids: torch.Tensor) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return ids.device.type == "cpu" and ids.shape[0] > 1 and not isinstance(model, DistributedDataParallel)


def length_groups(mask: torch.Tensor, overhead: int = SPLIT_OVERHEAD) -> list[tuple[torch.Tensor, int]] | None:
    """Rows of a right-padded batch in contiguous length groups minimising padded positions plus
    ``overhead`` per group (exact dynamic programme over the sorted lengths); None if one group is best."""
    lengths = mask.sum(1)
    if not bool((mask[:, :-1] >= mask[:, 1:]).all()):  # not right-padded: leave it alone
        return None
    order = torch.argsort(lengths, stable=True)
    ls = lengths[order].tolist()
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * ls[j - 1] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    if len(bounds) == 1:
        return None
    return [(order[i:j], int(ls[j - 1])) for i, j in reversed(bounds)]


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
