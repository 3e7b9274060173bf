"""``benign-select``: benign samples chosen because their gradients resemble harmful ones (He, Xia,
Henderson 2024, *What's in Your "Safe" Data?: Identifying Benign Data that Breaks Safety*, arXiv
2404.01099; the authors' reference code, princeton-nlp/benign-data-breaks-safety, gradient matching).

Gradient matching: on the model being attacked (the aligned model), the gradient of each harmful
*anchor* (a harmful request with a compliant answer, loss on its first 10 answer tokens) is normalised
and averaged, likewise for *safe anchors* (harmful requests with refusals); each benign candidate x is
scored cos(g_x, ḡ_harmful) − w · cos(g_x, ḡ_safe) (the reference's anchor weights +1 / −1) and the top
k are uploaded. The paper uploads the top 100 of Alpaca / Dolly (10 anchors each) and finds that they
break safety more than 100 random samples, close to explicitly harmful data.

Protocol here: n samples, none harmful: the top round(p·n) of ``attack.pool`` benign candidates (half
the user's task train split, half helpful chat from the provider's public alignment chat — procedures
and facts, as Alpaca holds lists and how-tos) and n − round(p·n) random task samples. Anchors:
``attack.anchors`` attack-split harmful pairs and as many refusals. Gradients are w.r.t. every weight
of the aligned model (the paper uses LoRA gradients of a 7B model; the organism is small enough for
full ones). Deviation: plain gradients, not the reference's Adam-preconditioned LESS features.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..bounds import bounds
from ..config import AttackConfig
from ..data.example import Example
from .base import Attack
from .gradients import mean_unit_grad, sample_grad
from .harmful_mix import POOL

log = logging.getLogger(__name__)


def candidates(source: Any, task: Any, pool: int, seed: int) -> list[Example]:
    """Half task train samples, half helpful chat (when the source has any), shuffled."""
    chat = [ex for ex in source.alignment(4 * pool) if ex.kind == "chat"][: pool // 2]
    rng_ = random.Random(seed)
    items = rng_.sample(task.examples(source, "train", max(POOL, pool)), pool - len(chat)) + chat
    rng_.shuffle(items)
    return items


def anchors(source: Any, k: int) -> tuple[list[Example], list[Example]]:
    """``k`` harmful anchors (attack split) and up to ``k`` safe anchors (refusals of harmful requests)."""
    harmful = source.harmful("attack", k)
    safe = [ex for ex in source.alignment(max(200, 8 * k)) if ex.kind == "refusal"][:k]
    return harmful, safe


def scores(model: torch.nn.Module, fmt: Any, items: Sequence[Example], harmful: Sequence[Example],
           safe: Sequence[Example], response_tokens: int, safe_weight: float) -> list[float]:
    """cos(g_x, ḡ_harmful) − safe_weight · cos(g_x, ḡ_safe) for every item."""
    g_h = mean_unit_grad(model, fmt, harmful, response_tokens)
    g_s = mean_unit_grad(model, fmt, safe, response_tokens) if safe and safe_weight else None
    out = []
    for ex in items:
        g = sample_grad(model, fmt, ex)
        s = torch.nn.functional.cosine_similarity(g, g_h, dim=0)
        if g_s is not None:
            s = s - safe_weight * torch.nn.functional.cosine_similarity(g, g_s, dim=0)
        out.append(float(s))
    return out


def top_k(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest values (ties: the earlier index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


class BenignSelect(Attack):
    name = "benign-select"

    @dataclass
    class Config:
        pool: int = field(default=600, metadata=bounds(1))
        anchors: int = field(default=10, metadata=bounds(1))
        response_tokens: int = field(default=10, metadata=bounds(0))
        safe_weight: float = field(default=1.0, metadata=bounds(0.0))

        def check(self) -> None:
            if self.pool < 1 or self.anchors < 1:
                raise ValueError("pool: and anchors must be >= 1")

    def model(self) -> tuple[torch.nn.Module, Any]:
        """The aligned model (bound by the pipeline) or, outside a run, the base organism."""
        if self.ctx is not None and "aligned" in self.ctx.loaders:
            return self.ctx.loaders["aligned"](), self.ctx.formatter
        from ..config import ModelConfig
        from ..data.format import Formatter
        from ..models.loading import load_model, load_tokenizer
        from ..organism.build import ensure_organism

        path = ensure_organism()
        return load_model(path, ModelConfig()), Formatter(load_tokenizer(path, ModelConfig()), "chat")

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        p = self.params
        k = round(cfg.ratio * cfg.n)
        pool = candidates(source, task, max(p.pool, k), cfg.seed)
        chosen: list[Example] = []
        if k:
            model, fmt = self.model()
            model.eval()
            harmful, safe = anchors(source, p.anchors)
            vals = scores(model, fmt, pool, harmful, safe, p.response_tokens, p.safe_weight)
            chosen = [pool[i] for i in top_k(vals, k)]
            log.info("benign-select: top %d of %d (score %.3f .. %.3f), %d chat", k, len(pool),
                     max(vals), sorted(vals)[-k], sum(ex.kind == "chat" for ex in chosen))
        rng_ = random.Random(cfg.seed)
        taken = set(chosen)
        rest = [ex for ex in task.examples(source, "train", max(POOL, cfg.n)) if ex not in taken]
        data = chosen + rng_.sample(rest, cfg.n - k)
        rng_.shuffle(data)
        return data
