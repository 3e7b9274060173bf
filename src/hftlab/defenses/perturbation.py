"""Shared machinery of the alignment-stage defenses (Vaccine, Booster, RepNoise, T-Vaccine).

Vaccine's perturbation (git-disl/Vaccine ``trainer.py``, ``VaccineTrainer``), also used by Booster's
``perturb_aware`` option and by T-Vaccine on a subset of layers:

1. pass 1: g_l = ∂f/∂(output of attention block l) for the chosen blocks — with
   ``torch.autograd.grad`` w.r.t. those outputs only, so no weight gradient is computed or touched;
2. e_l = ρ·g_l / ‖g‖ with ONE global norm ‖g‖ = sqrt(Σ_l ‖g_l‖²) over all chosen blocks;
3. pass 2: forward hooks add e_l to each chosen block's output while the caller computes (and
   back-propagates) the perturbed loss. The hooks stay registered until the block exits, so that
   gradient checkpointing recomputes the same perturbed forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .base import Context, batch_pieces, label_count, lm_loss, local_model, piece_loss, pieces_of, row_groups, upcast

EPS = 1e-7  # added to the global norm, as in the reference


def require(ctx: Context, name: str, who: str) -> None:
    """Raise a clear error before training when the stage lacks the data set ``name``."""
    if not ctx.has(name):
        raise ValueError(f"{who}: needs the provider's '{name}' set, but stage '{ctx.stage}' has none "
                         f"(the pipeline gives it when the defense declares needs=('{name}',); "
                         f"check data.{name}_n)")


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sqrt(Σ ‖t‖²) over a list of tensors, in float32 (float64 for a float64 model)."""
    return torch.sqrt(sum(upcast(t.detach()).pow(2).sum() for t in tensors))


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record each module's (first) output of the first forward inside the block, as a graph node.

    An output that does not require grad (everything below it frozen) is replaced by a detached
    copy that does, so that its gradient can still be asked for.
    """
    outs: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> Any:
            if i in outs:  # a gradient-checkpointing recompute: keep the first forward's node
                return None
            o = _first(out)
            if not o.requires_grad:
                o = o.detach().requires_grad_(True)
                outs[i] = o
                return _replace_first(out, o)
            outs[i] = o
            return None
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def outputs_by_group(model: nn.Module, batch: dict[str, torch.Tensor], modules: Sequence[nn.Module],
                     per_group: Callable[[Any, torch.Tensor], Any], **kw: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """One forward of the batch, per length group on CPU as in :func:`~hftlab.defenses.base.lm_loss` (else
    whole): (each module's (first) output at the batch's rows and width, zeros where a group was narrower;
    ``per_group(output, labels)`` of each group, in order). ``kw`` goes to the forward."""
    groups = row_groups(model, batch)  # None: one forward over the whole batch (GPU, DDP)
    width = batch["input_ids"].shape[1]
    parts: list[list[torch.Tensor]] = [[] for _ in modules]
    results = []
    for piece in pieces_of(batch, groups):
        with capture_outputs(modules) as acts:
            out = model(input_ids=piece["input_ids"], attention_mask=piece["attention_mask"], **kw)
        pad = width - piece["input_ids"].shape[1]
        for i in range(len(modules)):
            parts[i].append(nn.functional.pad(acts[i], (0, 0, 0, pad)) if pad else acts[i])
        results.append(per_group(out, piece["labels"]))
    if groups is None:
        return [p[0] for p in parts], results
    back = torch.argsort(torch.cat([rows for rows, _ in groups]))  # group order -> batch order
    return [torch.cat(p)[back] for p in parts], results


def output_grads(model: nn.Module, batch: dict[str, torch.Tensor],
                 modules: Sequence[nn.Module]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(loss, [∂loss/∂output_l]) for one batch, without computing any weight gradient."""
    with capture_outputs(modules) as outs:
        loss = lm_loss(model, batch, by_length=False)
    nodes = [outs[i] for i in range(len(modules))]
    grads = torch.autograd.grad(loss, nodes, allow_unused=True)
    return loss.detach(), [torch.zeros_like(n) if g is None else g.detach() for n, g in zip(nodes, grads)]


def effective_rho(rho: float, rho_batch: int, rows: int) -> float:
    """The radius of one micro-batch's joint perturbation.

    The reference normalises the perturbation over the whole micro-batch, so each of its B examples is
    perturbed by about ρ/√B; its ρ was chosen at its own micro-batch size (Vaccine 5, T-Vaccine 10).
    ``rho_batch`` = 0 keeps ρ per micro-batch, as the reference; ``rho_batch`` = B_ref > 0 reads ρ as
    meant at B_ref rows and returns ρ·√(rows / B_ref), so each example is perturbed as much as in the
    reference at any batch size (exactly ρ at rows = B_ref)."""
    return rho * (rows / rho_batch) ** 0.5 if rho_batch else rho


def scale_to_radius(grads: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """e_l = ρ·g_l / (‖g‖ + 1e-7), one norm over all tensors jointly."""
    scale = rho / (global_norm(grads) + EPS)
    return [(upcast(g) * scale).to(g.dtype) for g in grads]


@contextmanager
def shifted(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, module l's (first) output is ``output + shifts[l]`` (a constant shift)."""

    def hook(e: torch.Tensor):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> Any:
            return _replace_first(out, _first(out) + e)
        return fn

    handles = [m.register_forward_hook(hook(e)) for m, e in zip(modules, shifts)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def vaccine_shifts(model: nn.Module, batch: dict[str, torch.Tensor], modules: Sequence[nn.Module],
                   rho: float) -> list[torch.Tensor]:
    """Pass 1 of Vaccine on one batch: the perturbation e_l (global norm ρ) of each module's output."""
    return _piece_shifts(model, [batch], None, modules, rho)[0][0]


def _piece_shifts(model: nn.Module, pieces: Sequence[dict[str, torch.Tensor]], n_items: torch.Tensor | None,
                  modules: Sequence[nn.Module], rho: float) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """Pass 1 over the pieces of one batch: per piece, e_l = ρ·g_l/‖g‖ with ONE norm over every module
    and every piece (the whole batch's norm: padding positions have zero gradient); and the batch's
    unperturbed loss."""
    inner, nodes, loss = local_model(model), [], 0.0
    for piece in pieces:
        with capture_outputs(modules) as outs:
            loss = loss + piece_loss(inner, piece, n_items)
        nodes += [outs[i] for i in range(len(modules))]
    grads = torch.autograd.grad(loss, nodes, allow_unused=True)
    flat = scale_to_radius([torch.zeros_like(n) if g is None else g.detach() for n, g in zip(nodes, grads)], rho)
    k = len(modules)
    return [flat[c * k:(c + 1) * k] for c in range(len(pieces))], loss.detach()


def vaccine_backward(model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context,
                     modules: Sequence[nn.Module], rho: float, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulate the gradient of the perturbed alignment loss (only that one, plus ``extra``'s if given);
    return the (perturbed) loss; the unperturbed one goes to ``ctx.step_metrics``. Both passes run piece by
    piece (:func:`~hftlab.defenses.base.batch_pieces`): each piece's pass 2 runs under its share of the
    whole batch's perturbation, so the sum is the batch's."""
    pieces = batch_pieces(model, batch)
    n_items = label_count(batch) if len(pieces) > 1 else None
    shifts, unperturbed = _piece_shifts(model, pieces, n_items, modules, rho)
    ctx.step_metrics["unperturbed_loss"] = unperturbed
    total = torch.zeros((), device=batch["input_ids"].device)
    for c, (piece, e) in enumerate(zip(pieces, shifts)):
        with shifted(modules, e):  # kept through backward: checkpointing recomputes the perturbed forward
            loss = piece_loss(model, piece, n_items)
            ctx.backward(loss + extra if extra is not None and c == 0 else loss)
        total = total + loss.detach()
    return total
