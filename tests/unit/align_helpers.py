"""Shared pieces of the alignment-stage defense tests: data, contexts, direct computations.

The direct computations here are written independently of the defenses' code (their own hooks,
full ``backward`` with ``retain_grad``), so the maths tests compare two implementations.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch import nn

from hftlab.config import ModelConfig, TrainConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.introspect import attention_modules
from hftlab.models.loading import add_lora, load_model
from hftlab.training.loop import accelerator, train

SOURCE = get_source("organism")


def make_ctx(fmt: Formatter, harmful: bool = True, grad_accum: int | None = None, batch_size: int = 4,
             seed: int = 0) -> Context:
    """An alignment-stage context (harmful set optional), with the loop's accelerator if ``grad_accum``."""
    data = {"alignment": SOURCE.alignment(64)}
    if harmful:
        data["harmful"] = SOURCE.harmful("provider", 32)
    ctx = Context(stage="align", formatter=fmt, data=data, batch_size=batch_size, seed=seed)
    if grad_accum is not None:
        ctx.accelerator = accelerator(grad_accum)
    return ctx


def batch(fmt: Formatter, kind: str = "alignment", n: int = 4, offset: int = 0) -> dict[str, torch.Tensor]:
    data = SOURCE.alignment(64) if kind == "alignment" else SOURCE.harmful("provider", 32)
    return fmt.collate(fmt.encode_all(data[offset: offset + n]))


def mixed_batch(fmt: Formatter) -> dict[str, torch.Tensor]:
    """Short alignment rows and long harmful rows: a batch that ``lm_loss`` runs as length groups."""
    from hftlab.defenses.base import length_groups

    b = fmt.collate(fmt.encode_all(SOURCE.alignment(64)[:14] + SOURCE.harmful("provider", 4)[:2]))
    assert length_groups(b["attention_mask"])
    return b


def loss_of(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def param_grads(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradient of ``loss_fn(m)`` w.r.t. the trainable weights of a copy ``m`` of ``model``."""
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    loss_fn(m).backward()
    return grads(m)


def attention_output_grads(model: nn.Module, b: dict[str, torch.Tensor],
                           layers: list[int] | None = None) -> list[torch.Tensor]:
    """∂loss/∂(attention output l) by a full backward with ``retain_grad`` on a copy of the model."""
    m = copy.deepcopy(model)
    outs: dict[int, torch.Tensor] = {}
    mods = attention_modules(m)

    def keep(i: int):
        def fn(_m, _i, out):
            o = out[0] if isinstance(out, tuple) else out
            o.retain_grad()
            outs[i] = o
        return fn

    idx = layers if layers is not None else list(range(len(mods)))
    handles = [mods[i].register_forward_hook(keep(i)) for i in idx]
    loss_of(m, b).backward()
    for h in handles:
        h.remove()
    return [outs[i].grad.detach().clone() for i in idx]


def vaccine_direct(model: nn.Module, b: dict[str, torch.Tensor], rho: float,
                   layers: list[int] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(e_l, gradient of the perturbed loss) computed from the formula, on copies of ``model``."""
    idx = layers if layers is not None else list(range(len(attention_modules(model))))
    g = attention_output_grads(model, b, idx)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    e = [rho * x / (norm + 1e-7) for x in g]

    def perturbed(m: nn.Module) -> torch.Tensor:
        mods = attention_modules(m)
        handles = []
        for i, x in zip(idx, e):
            def add(_m, _i, out, x=x):
                return (out[0] + x, *out[1:]) if isinstance(out, tuple) else out + x
            handles.append(mods[i].register_forward_hook(add))
        try:
            return loss_of(m, b)
        finally:
            for h in handles:
                h.remove()

    return e, param_grads(model, perturbed)


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-6,
                       atol: float = 1e-6) -> None:
    """Each gradient equals the direct computation, elementwise within ``rtol`` plus ``atol`` times the
    tensor's largest entry, and within ``atol`` in relative norm.

    The models of these tests run in float64 (the ``organism`` fixture, :func:`tiny_gpt2`), so a
    length-grouped pass and a direct one differ by float64 summation order (~1e-15) except where
    Hugging Face computes in float32 (its loss casts the logits, RMSNorm its input): measured up to
    2e-7 of the largest entry. A wrong term, sign or normalisation moves the gradient by far more."""
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())[:4]
    for n in want:
        assert got[n].dtype == want[n].dtype == torch.float64, f"{n}: {got[n].dtype}, {want[n].dtype}"
        scale = float(want[n].abs().max())
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=max(atol * scale, 1e-300),
                                   msg=lambda m, n=n: f"{n}: {m}")
        err = float((got[n] - want[n]).norm()) / max(float(want[n].norm()), 1e-300)
        assert err <= atol, f"{n}: relative norm error {err:.2e}"


def tiny_gpt2(vocab_size: int, pad_id: int) -> nn.Module:
    """A second architecture: a random 2-layer GPT-2 over the organism's vocabulary, in float64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id)
    return GPT2LMHeadModel(cfg).double()


@pytest.fixture()
def organism(organism_path) -> nn.Module:
    """The organism in float64: the gradient comparisons then test the maths, not float32 rounding."""
    torch.manual_seed(0)
    return load_model(organism_path, ModelConfig()).double()


def second_arch_trains(defense: Any, tokenizer: Any, lora: bool) -> None:
    """Two steps (gradient accumulation 2) through the loop on GPT-2, with LoRA or full fine-tuning."""
    fmt = Formatter(tokenizer, max_length=64)
    model = tiny_gpt2(len(tokenizer), tokenizer.pad_token_id)
    if lora:
        model = add_lora(model, TrainConfig(lora=True, lora_r=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = make_ctx(fmt)
    cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=2, grad_accum=2, lora=lora)
    res = train(model, fmt.encode_all(ctx.data["alignment"]), cfg, defense=defense, ctx=ctx,
                pad_id=tokenizer.pad_token_id)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
    if lora:
        assert all("lora_" in n for n in changed)


def accumulation_matches(make_defense: Callable[[], Any], model: nn.Module, fmt: Formatter,
                         prepare: Callable[[Any, nn.Module, Context], None] | None = None) -> None:
    """Two micro-batches with grad_accum=2 accumulate the mean of the two single-batch gradients.

    Each micro-batch draws its own harmful batch (the single runs skip ahead to the same one) and the
    global RNG is reseeded before each, so every run sees the same data and noise.
    """
    b1, b2 = batch(fmt, n=2), batch(fmt, n=2, offset=2)

    def run(steps: list[int], accum: int) -> dict[str, torch.Tensor]:
        m = copy.deepcopy(model)
        ctx = make_ctx(fmt, grad_accum=accum, batch_size=2)
        d = make_defense()
        d.setup(m, ctx)
        if prepare:
            prepare(d, m, ctx)
        size = getattr(getattr(d, "cfg", None), "harmful_batch_size", 0) or None  # the defense's draw
        for k in range(steps[0]):
            ctx.next_batch("harmful", size)
        for k in steps:
            torch.manual_seed(1 + k)
            d.backward(m, (b1, b2)[k], ctx)
        accelerator(1)
        return grads(m)

    together, g1, g2 = run([0, 1], 2), run([0], 1), run([1], 1)
    assert_grads_close(together, {n: (g1[n] + g2[n]) / 2 for n in g1})


def logged_steps(defense: Any, model: nn.Module, fmt: Formatter, tmp_path, steps: int = 3,
                 ctx: Context | None = None) -> list[dict[str, float]]:
    """Train ``steps`` alignment steps with ``defense`` and return the rows of its ``losses.jsonl``."""
    import json

    ctx = ctx or make_ctx(fmt)
    log = tmp_path / "losses.jsonl"
    train(model, fmt.encode_all(ctx.data["alignment"]), TrainConfig(lr=1e-3, max_steps=steps, batch_size=4),
          defense=defense, ctx=ctx, log_path=log)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return rows
