"""Freeze (SPPFT): find the safety layers by probing, then fine-tune with them frozen.

Paper: Li et al., "Safety Layers in Aligned Large Language Models: The Key to LLM Security",
arXiv 2408.17003 (Section 3.2–3.3: cosine-similarity analysis; Section 4: SPPFT).
Reference: listen0425/Safety-Layers (only its README is readable here); its
``Code/Cos_sim_analysis/save_all_pairs_cos_sim.py`` procedure as documented by the replication
silu101/safety-layers-repo (``docs/REPRODUCTION_SPEC.md``, ``handoff_asr_eval/find_safety_layer.py``).

Probing: for ``pairs`` random pairs of prompts of each type — normal/normal (N-N), malicious/malicious
(M-M), normal/malicious (N-M) — take the hidden state of each prompt's last token at the output of every
decoder layer and the pair's cosine similarity per layer; average over pairs. The gap N-N − N-M appears at
the layers where the aligned model starts to tell harmful from benign input. The safety layers are the
contiguous block from the first layer whose gap exceeds ``margin`` (and stays positive after it) through
the last layer before the gap first stops increasing ("from the appearance of the gap … until the first
smoothing"). Those layers' trainable weights (their LoRA adapters, or their base weights in full
fine-tuning) get ``requires_grad=False`` before the optimiser is built, so they stay bit-identical.

Deviations:
- The paper refines the initial range with its over-rejection/parameter-scaling search (Section 3.4);
  not done here. ``layers="i-j"`` sets the block by hand (e.g. the block the paper reports for a model).
- The paper gives no numeric threshold for "the gap appears"; ``margin`` = 0.05 and "stays positive"
  follow the replication's ``find_gap_onset``. No gap above ``margin``: nothing is frozen (a warning).
- Prompts: normal = the non-refusal prompts of the alignment set (else the user's task prompts),
  malicious = its refusal prompts (else the provider's harmful prompts), ``prompts`` of each; the paper
  uses 100 normal and 100 AdvBench prompts, Alpaca template, hidden states of a 1-token beam search
  (= the prompt's forward pass).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from ..bounds import bounds
from ..data.format import collate
from ..models.introspect import decoder_layers, layer_index_of
from .base import Context, Defense, upcast

log = logging.getLogger(__name__)


@dataclass
class Config:
    layers: str = ""  # "i-j" (0-based, inclusive) to skip probing; "" = find them by probing
    pairs: int = field(default=500, metadata=bounds(1))  # r, sampled pairs per pair type (paper: 500)
    prompts: int = field(default=100, metadata=bounds(2))  # prompts per pool (paper: 100 normal, 100 malicious)
    margin: float = field(default=0.05, metadata=bounds(0.0, 2.0))  # gap N-N − N-M that counts as "appeared"

    def check(self) -> None:
        parse_layers(self.layers)


def parse_layers(text: str) -> list[int]:
    """"i-j" or "i" -> [i..j]; "" -> []."""
    if not text.strip():
        return []
    lo, _, hi = text.strip().partition("-")
    try:
        i, j = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"layers: expected 'i-j' (0-based layer indices), got {text!r}") from None
    if i < 0 or j < i:
        raise ValueError(f"layers: expected 0 <= i <= j, got {text!r}")
    return list(range(i, j + 1))


@torch.no_grad()
def last_token_states(model: nn.Module, ids: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """(n_prompts, n_layers, hidden): each decoder layer's output at each prompt's last token."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for k in range(0, len(ids), batch_size):
            chunk = ids[k: k + batch_size]
            batch = collate([{"input_ids": x, "labels": x} for x in chunk], pad_id)  # right-padded
            captured.clear()
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                  use_cache=False)
            last = torch.tensor([len(x) - 1 for x in chunk], device=device)
            rows = torch.arange(len(chunk), device=device)
            out.append(torch.stack([upcast(h[rows, last]) for h in captured], dim=1))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return torch.cat(out).cpu()


def pair_similarities(normal: torch.Tensor, malicious: torch.Tensor, pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Mean per-layer cosine similarity over ``pairs`` random N-N, M-M and N-M pairs."""
    def draw(a: torch.Tensor, b: torch.Tensor | None, rnd: random.Random) -> torch.Tensor:
        sims = []
        for _ in range(pairs):
            if b is None:
                i, j = rnd.sample(range(len(a)), 2)
                x, y = a[i], a[j]
            else:
                x, y = a[rnd.randrange(len(a))], b[rnd.randrange(len(b))]
            sims.append(torch.cosine_similarity(x, y, dim=-1))
        return torch.stack(sims).mean(0)

    return {"nn": draw(normal, None, random.Random(seed + 10)),
            "mm": draw(malicious, None, random.Random(seed + 100)),
            "nm": draw(normal, malicious, random.Random(seed + 1000))}


def safety_layers(gap: list[float], margin: float) -> list[int]:
    """From the first layer where the gap exceeds ``margin`` (and stays > 0) to the last one before it
    first stops increasing; [] when no gap appears."""
    onset = next((i for i, g in enumerate(gap) if g > margin and all(x > 0 for x in gap[i:])), None)
    if onset is None:
        return []
    end = onset
    while end + 1 < len(gap) and gap[end + 1] > gap[end]:
        end += 1
    return list(range(onset, end + 1))


def probe_prompts(ctx: Context) -> tuple[list[str], list[str]]:
    """(normal, malicious) prompts from the alignment set, falling back on the user / harmful sets."""
    align = ctx.data.get("alignment", [])
    normal = [ex.prompt for ex in align if ex.kind != "refusal"]
    malicious = [ex.prompt for ex in align if ex.kind == "refusal"]
    normal = normal or [ex.prompt for ex in ctx.data.get("user", []) if ex.kind == "task"]
    malicious = malicious or [ex.prompt for ex in ctx.data.get("harmful", [])]
    if len(normal) < 2 or len(malicious) < 2:
        raise ValueError("freeze: need >= 2 normal and >= 2 malicious prompts to probe for safety layers "
                         "(alignment set with refusals and benign examples); or set defense.layers=i-j")
    return normal, malicious


class Freeze(Defense):
    name = "freeze"
    needs = ("alignment",)
    Config = Config

    def find_layers(self, model: nn.Module, ctx: Context) -> list[int]:
        """The safety layers: ``layers`` if given, else by the cosine-similarity probe."""
        n_layers = len(decoder_layers(model))
        given = parse_layers(self.cfg.layers)
        if given:
            if given[-1] >= n_layers:
                raise ValueError(f"defense.layers: {self.cfg.layers!r} is out of range (the model has "
                                 f"{n_layers} layers, 0..{n_layers - 1})")
            return given
        normal, malicious = probe_prompts(ctx)
        fmt = ctx.formatter
        encode = [fmt.ids(fmt.prompt(p)) for p in normal[: self.cfg.prompts] + malicious[: self.cfg.prompts]]
        states = last_token_states(model, encode, fmt.tok.pad_token_id)
        k = min(len(normal), self.cfg.prompts)
        sims = pair_similarities(states[:k], states[k:], self.cfg.pairs, ctx.seed)
        gap = (sims["nn"] - sims["nm"]).tolist()
        ctx.state["safety_probe"] = {key: v.tolist() for key, v in sims.items()}
        log.info("freeze: per-layer gap N-N − N-M: %s", " ".join(f"{g:.3f}" for g in gap))
        return safety_layers(gap, self.cfg.margin)

    def setup(self, model: nn.Module, ctx: Context) -> None:
        layers = self.find_layers(model, ctx)
        ctx.state["safety_layers"] = layers
        if not layers:
            log.warning("freeze: no safety-layer gap found (margin %.3g): nothing frozen", self.cfg.margin)
            return
        owner = layer_index_of(model)
        frozen = [p for n, p in model.named_parameters() if p.requires_grad and owner.get(n) in layers]
        for p in frozen:
            p.requires_grad_(False)
        log.info("freeze: safety layers %s: %d trainable tensors frozen", layers, len(frozen))
