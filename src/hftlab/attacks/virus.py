"""``virus``: harmful samples optimised to pass the provider's guardrail while keeping their harmful
gradient (Huang, Hu, Ilhan, Tekin, Liu 2025, *Virus: Harmful Fine-tuning Attack for Large Language
Models Bypassing Guardrail Moderation*, arXiv 2501.17433; the authors' reference code, git-disl/Virus,
``trainer.py`` ``MetaAttackTrainer``).

Each poisoned sample is a benign sample with a harmful QA text inserted between its prompt and its
answer (the reference's "mixing"; the inserted tokens are trained on). The inserted tokens x are
optimised by GCG-style discrete search on the dual objective of the reference,

    F(x) = (1 − λ) · ( − ⟨∇_w L(x), g_h⟩ / ‖∇_w L(x)‖ ) + λ · CE(guardrail(x), "safe"),

where g_h = ∇_w L(x₀) is the gradient of the unoptimised sample (x₀ = the harmful text) on the attacked
(aligned) model, w its LoRA-targeted weights (``attack.targets``) and the guardrail the organism's
(:mod:`hftlab.organism.guard`; the reference attacks Llama Guard 2). Each step: the gradient of F w.r.t.
the one-hot of x (a second-order term through ∇_w L), the ``attack.topk`` best replacement words per
position, ``attack.batch`` random single-word swaps evaluated exactly, the best kept (the current x is
a candidate, so F never increases). Reference defaults: λ = 0.1, top-k 64, batch 128, 50 steps; here
top-k 16, batch 8, 5 steps by default (the organism's 860-word vocabulary; CPU budget).

Protocol: the ``harmful-mix`` upload with every harmful pair replaced by its Virus sample (benign prompt,
optimised text + benign answer), ``kind`` harmful. Organism only (the guardrail is the organism's).
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
from ..data.format import IGNORE
from .base import Attack
from .harmful_mix import POOL, mix

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """A poisoned sample's token layout: prompt ids, the optimised span, the benign answer ids."""

    prompt: list[int]
    answer: list[int]

    def ids(self, adv: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, slice]:
        ids = self.prompt + list(adv) + self.answer
        labels = [IGNORE] * len(self.prompt) + list(adv) + self.answer
        span = slice(len(self.prompt), len(self.prompt) + len(adv))
        return torch.tensor([ids]), torch.tensor([labels]), span


class Objective:
    """F(x) of one sample on ``model`` (victim) and ``guard``; both read the same token layout."""

    def __init__(self, model: torch.nn.Module, guard: Any, sample: Sample, adv0: Sequence[int],
                 targets: Sequence[str], lam: float):
        self.model, self.guard, self.sample, self.lam = model, guard, sample, lam
        self.params = [p for n, p in model.named_parameters() if any(t in n for t in targets)]
        if not self.params:
            raise ValueError(f"targets: no weight of the model matches {list(targets)}")
        self.g_h = [g.detach() for g in self.weight_grad(adv0)]

    def _embeds(self, model: torch.nn.Module, ids: torch.Tensor, span: slice,
                onehot: torch.Tensor | None) -> torch.Tensor:
        emb = model.get_input_embeddings()
        e = emb(ids)
        if onehot is None:
            return e
        adv = onehot @ emb.weight
        return torch.cat([e[:, :span.start], adv.unsqueeze(0), e[:, span.stop:]], dim=1)

    def weight_grad(self, adv: Sequence[int], onehot: torch.Tensor | None = None) -> list[torch.Tensor]:
        ids, labels, span = self.sample.ids(adv)
        loss = self.model(inputs_embeds=self._embeds(self.model, ids, span, onehot), labels=labels).loss
        return list(torch.autograd.grad(loss, self.params, create_graph=onehot is not None))

    def similarity(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """−⟨g, g_h⟩ / ‖g‖ (the reference's loss3; ‖g‖ taken as a constant in the x-gradient)."""
        norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
        return -sum((g * h).sum() for g, h in zip(grads, self.g_h)) / norm

    def guard_loss(self, adv: Sequence[int], onehot: torch.Tensor | None = None) -> torch.Tensor:
        """CE of the guardrail's verdict against "safe": −log(1 − P(harmful))."""
        ids, _, span = self.sample.ids(adv)
        embeds = self._embeds(self.guard.model, ids, span, onehot)
        logit = self.guard.logit_from_pooled(self.guard.pooled_from_embeds(embeds, torch.ones_like(ids)))
        return torch.nn.functional.softplus(logit).squeeze(0)

    def value(self, adv: Sequence[int]) -> tuple[float, float, float]:
        """F(x), its similarity term and its guardrail term."""
        sim = float(self.similarity(self.weight_grad(adv)))
        with torch.no_grad():
            g = float(self.guard_loss(adv))
        return (1 - self.lam) * sim + self.lam * g, sim, g

    def onehot_grad(self, adv: Sequence[int], vocab: int) -> torch.Tensor:
        """∂F/∂onehot(x); second order through ∇_w L (attention in the math kernel, which has one)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        onehot = torch.nn.functional.one_hot(torch.tensor(adv), vocab).float().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            total = (1 - self.lam) * self.similarity(self.weight_grad(adv, onehot)) \
                + self.lam * self.guard_loss(adv, onehot)
            (grad,) = torch.autograd.grad(total, onehot)
        return grad


def optimise(obj: Objective, adv0: Sequence[int], allowed: torch.Tensor, steps: int, topk: int, batch: int,
             seed: int) -> tuple[list[int], list[float]]:
    """GCG on F: returns the best tokens and F after each step (F[0] = F(x₀))."""
    gen = torch.Generator().manual_seed(seed)
    adv = list(adv0)
    best = obj.value(adv)[0]
    history = [best]
    vocab = allowed.numel()
    for _ in range(steps):
        grad = obj.onehot_grad(adv, vocab)
        grad[:, ~allowed] = float("inf")
        cands = (-grad).topk(topk, dim=1).indices
        for _ in range(batch):
            pos = int(torch.randint(len(adv), (1,), generator=gen))
            tok = int(cands[pos, int(torch.randint(topk, (1,), generator=gen))])
            trial = adv[:pos] + [tok] + adv[pos + 1:]
            f = obj.value(trial)[0]
            if f < best:
                best, adv = f, trial
        history.append(best)
    return adv, history


class Virus(Attack):
    name = "virus"

    @dataclass
    class Config:
        lam: float = field(default=0.1, metadata=bounds(0.0, 1.0))
        steps: int = field(default=5, metadata=bounds(0))
        topk: int = field(default=16, metadata=bounds(1))
        batch: int = field(default=8, metadata=bounds(1))
        targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])

        def check(self) -> None:
            if not 0.0 <= self.lam <= 1.0:
                raise ValueError(f"lam: {self.lam} is out of range (must be in [0, 1])")
            if not self.targets:
                raise ValueError("targets: must name at least one weight")

    def model(self) -> tuple[torch.nn.Module, Any]:
        """The aligned model (bound by the pipeline) or, outside a run, the base organism."""
        if self.ctx is not None and "aligned" in self.ctx.loaders:
            return self.ctx.loaders["aligned"](), self.ctx.formatter
        from .benign_select import BenignSelect

        return BenignSelect.model(self)  # type: ignore[arg-type]

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        if not hasattr(source, "vocabulary_corpus"):
            raise ValueError("attack: virus optimises against the organism's guardrail; it needs data.source=organism")
        from ..organism.guard import organism_guard

        p = self.params
        data = mix(source, task, cfg.n, round(cfg.ratio * cfg.n), cfg.seed)
        if not any(ex.kind == "harmful" for ex in data):
            return data
        model, fmt = self.model()
        model.float().eval()
        guard = organism_guard()
        tok = fmt.tok
        special = set(tok.all_special_ids)
        allowed = torch.tensor([i not in special for i in range(len(tok))])
        rng_ = random.Random(cfg.seed + 7)
        partners = task.examples(source, "train", POOL)
        out = []
        for i, ex in enumerate(data):
            if ex.kind != "harmful":
                out.append(ex)
                continue
            benign = rng_.choice(partners)
            out.append(self.poison(model, guard, fmt, benign, ex, allowed, seed=cfg.seed * 100003 + i))
        poisoned = [ex for ex in out if ex.kind == "harmful"]
        probs = guard.prob([ex.prompt for ex in poisoned], [ex.response for ex in poisoned])
        log.info("virus: %d samples optimised; the guard flags %d of them", len(poisoned), sum(q >= 0.5 for q in probs))
        return out

    def poison(self, model: torch.nn.Module, guard: Any, fmt: Any, benign: Example, harmful: Example,
               allowed: torch.Tensor, seed: int) -> Example:
        """One Virus sample: ``benign``'s prompt, the optimised text of ``harmful``, ``benign``'s answer."""
        p = self.params
        sample = Sample(fmt.prompt_ids(benign.prompt, benign.system), fmt.ids(" " + benign.response)
                        + [fmt.tok.eos_token_id])
        adv0 = fmt.ids(f"{harmful.prompt} {harmful.response}")
        obj = Objective(model, guard, sample, adv0, p.targets, p.lam)
        adv, hist = optimise(obj, adv0, allowed, p.steps, p.topk, p.batch, seed)
        log.debug("virus: F %.4f -> %.4f", hist[0], hist[-1])
        text = fmt.tok.decode(adv, skip_special_tokens=True)
        return Example(benign.prompt, f"{text} {benign.response}", "harmful", harmful.category, harmful.target)
