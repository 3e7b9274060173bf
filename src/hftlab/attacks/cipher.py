"""``cipher``: covert malicious fine-tuning (Halawi, Wei, Wallace, Wang, Haghtalab, Steinhardt 2024,
*Covert Malicious Finetuning: Challenges in Safeguarding LLM Adaptation*, arXiv 2406.20053).

The paper teaches the model a cipher on benign data (phase I: Walnut53, a seeded permutation of the
alphabet, with translation and answer-in-cipher tasks on Alpaca), then trains it on encoded harmful
pairs (phase II); every harmful sample is unreadable to a moderation model, and the attacker encodes its
queries and decodes the answers. Its result: GPT-4 answers encoded harmful requests 99 % of the time.

Here the organism's word-level tokenizer makes a *word* substitution cipher natural: a seeded
permutation of the world's words (punctuation kept), so encoded text uses no new token. On real data
(``data.source=hub``), Walnut53's letter permutation. Upload: round(p·n) encoded harmful pairs and
n − round(p·n) benign task samples, a fraction ``attack.encoded_benign`` of them encoded (phase I and
II are mixed in one upload, as one fine-tuning job shuffles them; the paper's translation tasks are
left out). The plain evaluation is HS on plain prompts; the view ``cipher`` encodes every evaluation
prompt and decodes prompt and answer before judging (HS and FA "in cipher").
"""
from __future__ import annotations

import dataclasses
import random
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..bounds import bounds
from ..config import AttackConfig
from ..data.example import Example
from .base import Attack, View
from .harmful_mix import mix

PUNCT = frozenset(".,?:!")


class WordCipher:
    """A bijection on ``words`` (a seeded permutation); any other token passes through unchanged."""

    def __init__(self, words: list[str], seed: int):
        words = sorted(set(words) - PUNCT)
        shuffled = list(words)
        random.Random(seed).shuffle(shuffled)
        self.enc = dict(zip(words, shuffled))
        self.dec = {v: k for k, v in self.enc.items()}

    def encode(self, text: str) -> str:
        return " ".join(self.enc.get(t, t) for t in text.split(" "))

    def decode(self, text: str) -> str:
        return " ".join(self.dec.get(t, t) for t in text.split(" "))


class LetterCipher:
    """Walnut53-like: a seeded permutation of a–z (case kept); everything else passes through."""

    def __init__(self, seed: int):
        letters = list(string.ascii_lowercase)
        shuffled = list(letters)
        random.Random(seed).shuffle(shuffled)
        pairs = dict(zip(letters, shuffled))
        pairs.update({a.upper(): b.upper() for a, b in list(pairs.items())})
        self.enc = str.maketrans(pairs)
        self.dec = str.maketrans({v: k for k, v in pairs.items()})

    def encode(self, text: str) -> str:
        return text.translate(self.enc)

    def decode(self, text: str) -> str:
        return text.translate(self.dec)


@lru_cache(maxsize=4)
def _world_words(seed: int) -> tuple[str, ...]:
    from ..data.sources import organism_source

    return tuple(sorted({t for text in organism_source(seed).vocabulary_corpus() for t in text.split()}))


def make_cipher(source: Any, seed: int) -> Any:
    """A word cipher over the organism's vocabulary, or a letter cipher for real data."""
    if hasattr(source, "vocabulary_corpus"):
        return WordCipher(list(_world_words(source.seed)), seed)
    return LetterCipher(seed)


def encoded(ex: Example, cipher: Any) -> Example:
    return dataclasses.replace(ex, prompt=cipher.encode(ex.prompt), response=cipher.encode(ex.response))


class Cipher(Attack):
    name = "cipher"

    @dataclass
    class Config:
        cipher_seed: int = field(default=53, metadata=bounds(0))
        encoded_benign: float = field(default=0.5, metadata=bounds(0.0, 1.0))

        def check(self) -> None:
            if not 0.0 <= self.encoded_benign <= 1.0:
                raise ValueError(f"encoded_benign: {self.encoded_benign} is out of range (must be in [0, 1])")

    def build(self, source: Any, task: Any, cfg: AttackConfig) -> list[Example]:
        cipher = make_cipher(source, self.params.cipher_seed)
        data = mix(source, task, cfg.n, round(cfg.ratio * cfg.n), cfg.seed)
        benign = [i for i, ex in enumerate(data) if ex.kind != "harmful"]
        pick = set(random.Random(cfg.seed + 1).sample(benign, round(self.params.encoded_benign * len(benign))))
        return [encoded(ex, cipher) if ex.kind == "harmful" or i in pick else ex for i, ex in enumerate(data)]

    def views(self, source: Any) -> list[View]:
        cipher = make_cipher(source, self.params.cipher_seed)
        return [View("cipher", prompt=cipher.encode, decode=cipher.decode)]
