"""The organism's guardrail: a moderation classifier the provider trains on its own labelled samples.

A logistic head on the mean-pooled last hidden state of the frozen *base* organism, over the chat-
formatted (prompt, response) pair — a small analogue of a moderation model such as Llama Guard or
BeaverDam, which also score (prompt, response) pairs. Training data is the provider's own and
disjoint from the attack and evaluation prompts: harmful = the provider's harmful set (alignment
phrasings x alignment contents, compliant answers); safe = the alignment data (the same harmful
prompts answered with refusals, helpful chat, task-format examples). A seeded 20 % of each class is
held out; :attr:`OrganismGuard.report` gives precision and recall on it.

Being differentiable in the input embeddings, it is also what the Virus attack optimises against
(:meth:`OrganismGuard.prob_from_embeds`).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..data.example import Example
from ..data.format import Formatter, collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardSpec:
    n_harmful: int = 500  # provider harmful samples (positives)
    n_safe: int = 1000  # alignment samples (negatives: refusals, chat, task format)
    heldout: float = 0.2
    l2: float = 1e-3
    seed: int = 0
    max_length: int = 128


class OrganismGuard:
    """Frozen base organism + standardised mean pooling + logistic head; ``prob`` is P(harmful)."""

    def __init__(self, spec: GuardSpec = GuardSpec()):
        from ..config import ModelConfig
        from ..models.loading import load_model, load_tokenizer
        from .build import ensure_organism

        path = ensure_organism()
        self.spec = spec
        self.tokenizer = load_tokenizer(path, ModelConfig())
        self.model = load_model(path, ModelConfig()).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fmt = Formatter(self.tokenizer, "chat", spec.max_length)
        self.report: dict[str, Any] = {}
        self._fit()

    # ---- features ------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        return [self.fmt.encode(Example(p, r, "chat"))["input_ids"] for p, r in zip(prompts, responses)]

    def pooled_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden state over the unmasked positions (right padding)."""
        out = self.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def features(self, rows: Sequence[list[int]], batch_size: int = 64) -> torch.Tensor:
        feats = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                batch = collate([{"input_ids": r, "labels": r} for r in rows[i:i + batch_size]],
                                self.tokenizer.pad_token_id)
                emb = self.model.get_input_embeddings()(batch["input_ids"])
                feats.append(self.pooled_from_embeds(emb, batch["attention_mask"]))
        return torch.cat(feats) if feats else torch.zeros(0, self.model.config.hidden_size)

    # ---- head ----------------------------------------------------------------------------------
    def logit_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return ((pooled - self.mu) / self.sd) @ self.w + self.b

    def prob_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """P(harmful) of rows given as input embeddings: differentiable (Virus optimises through it)."""
        return torch.sigmoid(self.logit_from_pooled(self.pooled_from_embeds(embeds, mask)))

    def prob(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if not prompts:
            return []
        with torch.no_grad():
            return torch.sigmoid(self.logit_from_pooled(self.features(self.encode(prompts, responses)))).tolist()

    def _fit(self) -> None:
        from ..data.sources import get_source

        source = get_source("organism")
        s = self.spec
        pos = source.harmful("provider", s.n_harmful)
        neg = source.alignment(s.n_safe)
        rng = random.Random(s.seed)
        split = {}
        for name, items in (("pos", pos), ("neg", neg)):
            idx = list(range(len(items)))
            rng.shuffle(idx)
            k = int(round(s.heldout * len(items)))
            split[name] = ([items[i] for i in idx[k:]], [items[i] for i in idx[:k]])
        train = [(ex, 1.0) for ex in split["pos"][0]] + [(ex, 0.0) for ex in split["neg"][0]]
        test = [(ex, 1.0) for ex in split["pos"][1]] + [(ex, 0.0) for ex in split["neg"][1]]
        x = self.features(self.encode([e.prompt for e, _ in train], [e.response for e, _ in train]))
        y = torch.tensor([t for _, t in train])
        self.mu, self.sd = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mu) / self.sd
        torch.manual_seed(s.seed)
        w = torch.zeros(z.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + s.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w.detach(), b.detach()
        probs = self.prob([e.prompt for e, _ in test], [e.response for e, _ in test])
        self.report = classification_report([p >= 0.5 for p in probs], [t > 0.5 for _, t in test])
        log.info("organism guard: held-out %s", self.report)


def classification_report(pred: Sequence[bool], gold: Sequence[bool]) -> dict[str, Any]:
    """Precision, recall (of the harmful class) and accuracy, in percent."""
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    acc = sum(p == g for p, g in zip(pred, gold))
    return {"heldout_precision": 100.0 * tp / (tp + fp) if tp + fp else 0.0,
            "heldout_recall": 100.0 * tp / (tp + fn) if tp + fn else 0.0,
            "heldout_accuracy": 100.0 * acc / len(gold) if gold else 0.0, "heldout_n": len(gold)}


@lru_cache(maxsize=2)
def organism_guard(spec: GuardSpec = GuardSpec()) -> OrganismGuard:
    """The guard, trained once per process (a few seconds on one core)."""
    return OrganismGuard(spec)
