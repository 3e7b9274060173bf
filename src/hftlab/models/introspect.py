"""Find a decoder's layers, attention blocks and linear weights by type, not by Llama-only names.

Works on Llama, Qwen2, Gemma, Mistral, GPT-2 …, bare or wrapped in PEFT / DDP.
"""
from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost HF model (through DDP's ``module`` and PEFT's ``base_model.model``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif type(model).__name__.startswith("Peft") and hasattr(model, "base_model"):
            model = model.base_model.model if hasattr(model.base_model, "model") else model.base_model
        else:
            return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in order: the longest ModuleList of identical block types."""
    best: list[nn.Module] = []
    for module in unwrap(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and any(isinstance(c, nn.Module) for c in module[0].children()):
                best = list(module)
    if not best:
        raise ValueError(f"{type(model).__name__}: no stack of decoder layers found")
    return best


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's self-attention block (the child whose class name contains 'Attention')."""
    return _children_by_kind(model, ("attention", "attn"), "attention block")


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's feed-forward block (the child whose class name contains 'MLP', else 'FeedForward')."""
    return _children_by_kind(model, ("mlp", "feedforward", "ffn"), "MLP block")


def _children_by_kind(model: nn.Module, keys: tuple[str, ...], what: str) -> list[nn.Module]:
    """Per decoder layer, the first direct child whose class name contains a key (tried in order)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        for key in keys:
            found = [m for _, m in layer.named_children() if key in type(m).__name__.lower()]
            if found:
                out.append(found[0])
                break
        else:
            raise ValueError(f"layer {i} ({type(layer).__name__}): no {what} found")
    return out


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (Llama's ``norm``, GPT-2's ``ln_f``…).

    Found as the last child, whose class name contains 'Norm', of the module that holds the layers.
    """
    first = decoder_layers(model)[0]
    for module in unwrap(model).modules():
        kids = list(module.children())
        if any(isinstance(k, nn.ModuleList) and len(k) and k[0] is first for k in kids):
            norms = [k for k in kids if "norm" in type(k).__name__.lower()]
            if norms:
                return norms[-1]
    raise ValueError(f"{type(model).__name__}: no final norm next to the decoder layers")


def layer_index_of(model: nn.Module) -> dict[str, int]:
    """Name (as ``model.named_parameters()`` gives it) -> index of its decoder layer.

    Embeddings, final norm and head are absent. Matching is by identity, so wrappers do not matter.
    """
    owner = {id(p): i for i, layer in enumerate(decoder_layers(model)) for p in layer.parameters()}
    return {n: owner[id(p)] for n, p in model.named_parameters() if id(p) in owner}
