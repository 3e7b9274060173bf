"""Prompt formatting (chat template or Alpaca), tokenisation with label masks, batching.

Training batches are right-padded with labels -100 on the prompt and padding; generation batches are
left-padded so that every row's next token is at the same position.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.example import Example

IGNORE = -100
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)
# A task with an input (SST2, AG News, some Alpaca rows) stores ``instruction + INPUT_MARK + input`` as its
# prompt: the Alpaca template then reads exactly as the reference's "paired with an input" variant, and a
# chat template sees the two parts separated by a blank line.
INPUT_MARK = "\n\n### Input:\n"
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


def with_input(instruction: str, input_text: str = "") -> str:
    """The prompt of an instruction with an (optional) input, see :data:`INPUT_MARK`."""
    return f"{instruction}{INPUT_MARK}{input_text}" if input_text else instruction


class Formatter:
    """Turns Examples into token ids for one tokenizer and one prompt template."""

    def __init__(self, tokenizer: Any, template: str = "auto", max_length: int = 128):
        self.tok = tokenizer
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        self.template = template
        self.max_length = max_length

    def prompt(self, prompt: str, system: str = "") -> str:
        """The text the model sees before its answer."""
        if self.template == "chat":
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt.replace(INPUT_MARK, "\n\n")}]
            return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        bos = self.tok.bos_token or ""
        return bos + self._alpaca(prompt, system)

    def _alpaca(self, prompt: str, system: str = "") -> str:
        head = f"{system}\n\n" if system else ""
        return head + (ALPACA_INPUT if INPUT_MARK in prompt else ALPACA).format(prompt=prompt)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str, system: str = "") -> list[int]:
        """Token ids of :meth:`prompt`. Alpaca text is tokenised as the reference code does,
        ``tokenizer(text)`` with the tokenizer's own special tokens (BOS) and no trailing EOS."""
        if self.template == "chat":
            return self.ids(self.prompt(prompt, system))
        ids = self.tok(self._alpaca(prompt, system))["input_ids"]
        eos = self.tok.eos_token_id
        while ids and eos is not None and ids[-1] == eos and eos != self.tok.bos_token_id:
            ids = ids[:-1]
        return ids

    def encode(self, ex: Example, train_on_prompt: bool = False) -> dict[str, list[int]]:
        """input_ids and labels (prompt masked unless ``train_on_prompt``), truncated to max_length."""
        p = self.prompt_ids(ex.prompt, ex.system)
        r = self.ids(ex.response) + [self.tok.eos_token_id]
        ids = (p + r)[: self.max_length]
        labels = ((p if train_on_prompt else [IGNORE] * len(p)) + r)[: self.max_length]
        return {"input_ids": ids, "labels": labels}

    def encode_all(self, data: Sequence[Example], train_on_prompt: bool = False) -> list[dict[str, list[int]]]:
        return [self.encode(ex, train_on_prompt) for ex in data]

    def collate(self, feats: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch."""
        return collate(feats, self.tok.pad_token_id)

    def generation_batch(self, prompts: Sequence[str], systems: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded prompt batch for generation."""
        systems = systems or [""] * len(prompts)
        rows = [self.prompt_ids(p, s)[-self.max_length:] for p, s in zip(prompts, systems)]
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def collate(feats: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), width), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(feats), width), dtype=torch.long)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
