"""TAR: tamper-resistance by first-order meta-learning against simulated fine-tuning attacks.

Paper: Tamirisa, Bharathi, Phan, Zhou, Gatti, Suresh, Lin, Wang, Wang, Arel, Zou, Song, Li, Hendrycks,
Mazeika — "Tamper-Resistant Safeguards for Open-Weight LLMs", ICLR 2025, arXiv 2408.00761.
Reference: rishub-tamirisa/tamper-resistance ``modules/training.py`` (``tar_training_loop``,
``inner_loop_step``, ``tamper_resistance_obj``, ``schedule``) and ``modules/objectives.py``
(``dpo_loss_obj``, ``max_entropy_loss``, ``obj_model_mse_representations``), checked against them;
defaults from ``run_tar_dpo.sh``, the harmful-request-refusal setting.

One TAR (outer) step, from weights θ, with N adversaries (tasks):

    for each task n: sample an adversary lr η_n from ``adversary_lrs`` and a held-out TR batch x_tr;
        θ'_0 = θ;  θ'_{i+1} = AdamW_η(θ'_i, ∇ CE(harmful batch_i; θ'_i))      (i = 0..K−1, fresh state)
        after step i: g_TR += s · exp(λ(i − (K−1))) / N · ∇_{θ'} L_TR(x_tr; θ'_{i+1})   (first order)
    restore θ;  g = retain_scale · ∇ L_retain(alignment batch; θ) + g_TR

The loop's optimiser then steps with g (the outer step). L_TR is the tamper-resistance loss; s is
``tr_scale``, λ ``schedule_lambda`` (the reference's ``--use_weighting_schedule``).

Which tamper-resistance loss: the reference has two. Negative entropy of the next-token distribution
(``max_entropy``) is its loss for weaponization-knowledge restriction, where the goal is that the
tampered model cannot predict the forget text. For harmful-request refusal, the setting of harmful
fine-tuning and of HS (does the tampered model carry out a harmful request?), its script
``run_tar_dpo.sh`` uses ``dpo``: the DPO loss (sigmoid, β = 0.1) preferring the refusal (chosen) over
the harmful completion (rejected) of the same prompt, with the reference log-probabilities of the
model TAR starts from, evaluated on the adversary's weights. That is the default here
(``tr_loss=dpo``); ``tr_loss=entropy`` is the other one. The retain loss is the cross-entropy of the
alignment batch (the reference's refusal run: ``obj_standard_max_next_token`` on its benign retain
set; here the alignment set, refusals and benign chat); ``retain_representations=true`` adds the
reference's representation-engineering term, the mean over hidden states of the per-token ℓ2
distance to the model TAR starts from (the reference's ``--retain_representations``, used in its
weaponization runs, not in the refusal run).

Warm-up: TAR starts from a model that already has a safeguard (Algorithm 1's initial safeguard; in
the refusal setting Llama-3-8B-Instruct's own refusal training). The organism's alignment starts from
the base model, so the first ``warmup`` share of the alignment steps is plain SFT alignment (the
initial safeguard) and TAR runs after it; the reference log-probabilities (and the representation
reference) are those of the model at the first TAR step, as the reference precomputes them with the
model it starts from.

Scale (the organism aligns in 375 steps of 32 rows; a run should cost at most ~5× SFT's alignment):
the reference's refusal run takes 100 outer steps with K = 8 inner steps and 2 tasks (its
weaponization runs: 750 steps, K = 64, 1 task). Here K = 8 (that run's value) with 1 task, adversary
and TR batches of 8 rows, and a TAR step on every second step after a warm-up of half the steps:
94 TAR steps, close to the refusal run's 100. A TAR step is K adversary passes and K TR passes on
small batches plus the retain pass: measured at 13.2× an SFT step on the organism (process CPU time,
``bench.alignment_defenses``' harness; K = 4: 6.8×, K = 8 with the TR loss every second inner step:
9.4×), so a run costs about 0.5 + 0.25·(13.2 + 1) ≈ 4× SFT's alignment. The adversary lrs keep
the reference's ratios (2e-6, 2e-5, 4e-5 = 1 : 10 : 20) and put the largest at the organism attack's
lr (2e-3): 1e-4, 1e-3, 2e-3 (the reference's are the lrs of its own test-time attacks on an 8B
model, far below the organism's).

On the organism (docs/results.md, default protocol, p = 0.1): with ``inner_steps=4 every=4`` (the CPU
did not allow the default on several seeds) the attack's HS is 12.8 / 31.5 / 26.5 / 34.8 / 41.0 against
SFT's 74.0 / 29.5 / 59.8 / 80.0 / 60.2 (seeds 0-4) at FA ≥ 99; the aligned models refuse everything and
keep their benign accuracy, but after the attack their benign accuracy falls to 23-46 % (SFT: 72-87 %);
the default (seed 0) gives HS 48.8 and a collapsed fine-tuned model (benign accuracy 1 %).

Deviations:
- One task per outer step (the refusal run: 2), for cost; ``tasks`` sets it.
- The warm-up is plain SFT steps inside the alignment stage, not a separately trained model; the
  reference's outer optimiser (schedule-free AdamW, lr 6e-5, 32 warm-up steps) is the loop's.
- The TR gradient is always added (the refusal run passes ``--unbounded``; the lower bound on the
  TR loss is not implemented).
- The adversary is full-weight AdamW (torch defaults, weight decay 0.01, constant lr, as the
  reference's inner optimiser) written out on the trainable weights, so the loop's ``.grad`` is
  never touched; under LoRA alignment it trains the adapter only.
- The adversary's and the TR batches are one batch each of ``harmful_batch_size`` rows and
  ``tr_batch_size`` pairs (the reference: ``gradient_accumulation_steps`` micro-batches of its batch
  size); the pairs are the provider's harmful examples whose prompt has a refusal in the alignment set.
- With gradient accumulation, every micro-batch runs its own inner loop (the accelerator averages
  them, as a larger N would).
- The entropy loss and the representation term average over the response tokens (entropy) and the
  non-padding tokens (representations); the reference pads to a fixed length and averages over all.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds, one_of
from ..data.format import IGNORE
from .base import Context, Defense, grads_of, linear_term, lm_loss, local_model, upcast
from .perturbation import require


@dataclass
class Config:
    tr_loss: str = field(default="dpo", metadata=one_of("dpo", "entropy"))  # refusal setting: dpo
    tr_scale: float = field(default=0.1, metadata=bounds(0.0, None))  # --tar_tamper_resistance_grad_scale
    retain_scale: float = field(default=1.0, metadata=bounds(0.0, None))  # --tar_retain_scale
    retain_representations: bool = False  # the refusal run: off
    inner_steps: int = field(default=8, metadata=bounds(1, 10_000))  # K (refusal run: 8)
    tasks: int = field(default=1, metadata=bounds(1, 100))  # adversaries per outer step (refusal run: 2)
    adversary_lrs: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 2e-3])  # reference ratios
    schedule_lambda: float = field(default=0.0625, metadata=bounds(0.0, None))  # λ of the TR weights
    subsample: int = field(default=1, metadata=bounds(1, 10_000))  # TR loss every `subsample` inner steps
    beta: float = field(default=0.1, metadata=bounds(0.0, None))  # DPO temperature (reference: 0.1)
    harmful_batch_size: int = field(default=8, metadata=bounds(1, None))  # adversary rows per inner step
    tr_batch_size: int = field(default=8, metadata=bounds(1, None))  # (refusal, harmful) pairs per TR batch
    warmup: float = field(default=0.5, metadata=bounds(0.0, 1.0))  # share of steps of plain SFT first
    every: int = field(default=2, metadata=bounds(1, None))  # a TAR step every `every` steps after it
    adversary_weight_decay: float = field(default=0.01, metadata=bounds(0.0, None))  # torch AdamW default

    def check(self) -> None:
        if not self.adversary_lrs or any(not (isinstance(x, (int, float)) and 0 < x <= 10)
                                         for x in self.adversary_lrs):
            raise ValueError(f"adversary_lrs: expected a non-empty list of lrs in (0, 10], got {self.adversary_lrs}")
        if self.inner_steps % self.subsample:
            raise ValueError(f"subsample: {self.subsample} does not divide inner_steps={self.inner_steps}")


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over each row's labelled tokens of log p(token) (the reference's ``get_batch_logps``)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = nn.functional.cross_entropy(upcast(logits[:, :-1]).transpose(1, 2), labels, ignore_index=IGNORE,
                                     reduction="none")
    return -ce.sum(1)


def dpo_loss(model: nn.Module, chosen: dict, rejected: dict, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean of −log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])."""
    margin = (sequence_logps(model, chosen) - ref_chosen) - (sequence_logps(model, rejected) - ref_rejected)
    return -nn.functional.logsigmoid(beta * margin).mean()


def entropy_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Negative mean entropy of the next-token distribution at the response positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != IGNORE
    logp = torch.log_softmax(upcast(logits[:, :-1][keep]), -1)
    return (logp.exp() * logp).sum(-1).mean()


def representation_distance(model: nn.Module, ref: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over hidden states of the mean per-token ‖h − h_ref‖₂ over the non-padding tokens."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
    with torch.no_grad():
        ref_h = ref(**kw).hidden_states
    hs = model(**kw).hidden_states
    keep = batch["attention_mask"].bool()
    return torch.stack([(upcast(h) - upcast(r))[keep].norm(dim=-1).mean() for h, r in zip(hs, ref_h)]).mean()


class InnerAdamW:
    """The adversary's AdamW (torch's update, fresh state) on a list of tensors, without ``.grad``."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            p.mul_(1 - self.lr * self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2).add_(self.eps), value=-self.lr / c1)


class TAR(Defense):
    """Alignment whose update also lowers the tamper-resistance loss after simulated harmful fine-tuning."""

    name = "tar"
    needs = ("harmful", "alignment")
    Config = Config

    def setup(self, model: nn.Module, ctx: Context) -> None:
        require(ctx, "harmful", "tar")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rand = random.Random(f"tar:{ctx.seed}")
        refusals = {e.prompt: e for e in ctx.data.get("alignment", []) if e.kind == "refusal"}
        harmful = [e for e in ctx.data["harmful"] if e.prompt in refusals]
        if self.cfg.tr_loss == "dpo" and not harmful:
            raise ValueError("tar: tr_loss=dpo needs harmful examples whose prompt has a refusal in the "
                             "alignment set (on the hub source: data.alignment_set=refusal)")
        fmt = ctx.formatter
        self.pairs = [(c, r) for c, r in zip(fmt.encode_all([refusals[e.prompt] for e in harmful]),
                                             fmt.encode_all(harmful))]
        self.tr_rows = fmt.encode_all(ctx.data["harmful"])  # entropy: harmful completions
        self.order: list[int] = []
        self.ref_logps: torch.Tensor | None = None
        self.ref_model: nn.Module | None = None

    def is_tar_step(self, ctx: Context) -> bool:
        start = round(self.cfg.warmup * ctx.total_steps)
        return ctx.step >= start and (ctx.step - start) % self.cfg.every == 0

    def backward(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        if not self.is_tar_step(ctx):
            loss = lm_loss(model, batch)
            ctx.backward(loss)
            return loss.detach()
        net = local_model(model)
        if self.ref_logps is None:
            self._start(net, ctx)
        tr_grads = self.tamper_resistance_grads(net, ctx)
        retain = lm_loss(model, batch)
        if self.cfg.retain_representations:
            retain = retain + representation_distance(model, self.ref_model, batch)
        ctx.backward(self.cfg.retain_scale * retain + linear_term(self.params, tr_grads))
        return retain.detach()

    def _start(self, net: nn.Module, ctx: Context) -> None:
        """Freeze what the model TAR starts from gives: DPO reference log-probs, representation reference."""
        rows = []
        with torch.no_grad():
            for i in range(0, len(self.pairs), 64):
                chunk = self.pairs[i: i + 64]
                c, r = self._collate([p[0] for p in chunk], ctx), self._collate([p[1] for p in chunk], ctx)
                rows.append(torch.stack([sequence_logps(net, c), sequence_logps(net, r)], 1))
        self.ref_logps = torch.cat(rows) if rows else torch.zeros(0, 2)
        if self.cfg.retain_representations:
            self.ref_model = copy.deepcopy(net).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

    def _collate(self, feats: list, ctx: Context) -> dict[str, torch.Tensor]:
        return {k: v.to(ctx.device) for k, v in ctx.formatter.collate(feats).items()}

    def draw_tr_batch(self, ctx: Context) -> tuple[dict, ...]:
        """The held-out TR batch x_tr: (chosen, rejected, ref log-probs) pairs, or harmful rows for entropy."""
        n = len(self.pairs) if self.cfg.tr_loss == "dpo" else len(self.tr_rows)
        idx = []
        for _ in range(min(self.cfg.tr_batch_size, n)):
            if not self.order:
                self.order = list(range(n))
                self.rand.shuffle(self.order)
            idx.append(self.order.pop())
        if self.cfg.tr_loss == "entropy":
            return (self._collate([self.tr_rows[i] for i in idx], ctx),)
        ref = self.ref_logps[idx].to(ctx.device)
        return (self._collate([self.pairs[i][0] for i in idx], ctx),
                self._collate([self.pairs[i][1] for i in idx], ctx), ref[:, 0], ref[:, 1])

    def tr_loss(self, net: nn.Module, tr_batch: tuple) -> torch.Tensor:
        if self.cfg.tr_loss == "entropy":
            return entropy_loss(net, tr_batch[0])
        return dpo_loss(net, *tr_batch, self.cfg.beta)

    def tamper_resistance_grads(self, net: nn.Module, ctx: Context) -> list[torch.Tensor]:
        """Σ over tasks and inner steps of the weighted TR gradients at the adversary's weights; the
        weights are restored exactly afterwards."""
        cfg, K = self.cfg, self.cfg.inner_steps
        total = [torch.zeros_like(p) for p in self.params]
        backup = [p.detach().clone() for p in self.params]
        metrics: dict[str, float] = {"tar_step": 1.0}
        try:
            for _ in range(cfg.tasks):
                tr_batch = self.draw_tr_batch(ctx)
                lr = self.rand.choice(cfg.adversary_lrs)
                adversary = InnerAdamW(self.params, lr, cfg.adversary_weight_decay)
                for i in range(K):
                    h = lm_loss(net, ctx.next_batch("harmful", cfg.harmful_batch_size))
                    adversary.step(grads_of(h, self.params))
                    metrics.setdefault("adversary_loss_first", float(h.detach()))
                    metrics["adversary_loss_last"] = float(h.detach())
                    if (i + 1) % cfg.subsample:
                        continue
                    weight = cfg.tr_scale * math.exp(cfg.schedule_lambda * (i - (K - 1))) / cfg.tasks
                    tr = self.tr_loss(net, tr_batch)
                    for acc, g in zip(total, grads_of(tr, self.params)):
                        acc.add_(g, alpha=weight)
                    metrics["tr_loss_last"] = float(tr.detach())
                with torch.no_grad():
                    for p, b in zip(self.params, backup):
                        p.copy_(b)
                metrics["adversary_lr"] = lr
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
        ctx.step_metrics.update(metrics)
        return total

    def teardown(self, model: nn.Module, ctx: Context) -> None:
        self.params, self.pairs, self.tr_rows, self.ref_model = [], [], [], None
