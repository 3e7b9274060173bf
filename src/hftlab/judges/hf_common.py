"""What the model-based judges share: where their checkpoint comes from, loading it safely, and errors.

A judge's checkpoint is, in order: the ``model`` argument (``eval.judge_model``), the environment variable
``HFTLAB_<NAME>_MODEL`` (e.g. ``HFTLAB_BEAVER_DAM_MODEL``, handy for a local mirror), or the paper's hub
id. Weights load from safetensors only unless ``allow_pickle`` is set; ``trust_remote_code`` is never on.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


class JudgeError(UserError, ValueError):
    """A judge that cannot work as configured (wrong labels, missing tokens, bad endpoint); one line."""


def resolve(name: str, model: str, default: str) -> str:
    env = f"HFTLAB_{name.upper().replace('-', '_')}_MODEL"
    return model or os.environ.get(env, "") or default


def judge_device() -> torch.device:
    """The training device (a judge runs in the process that evaluates)."""
    from ..models.loading import device

    return device()


def judge_dtype() -> torch.dtype:
    return torch.bfloat16 if judge_device().type == "cuda" else torch.float32


def load(auto_cls: Any, path: str, judge: str, revision: str | None = None, allow_pickle: bool = False,
         **tok_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on the judge device; errors are one line naming the judge."""
    from transformers import AutoTokenizer

    from ..models.loading import ModelLoadError, _explain

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, **tok_kwargs)
        model = auto_cls.from_pretrained(path, revision=revision, dtype=judge_dtype(), trust_remote_code=False,
                                         use_safetensors=None if allow_pickle else True)
    except OSError as e:
        msg = _explain(path, e)
        if "safetensors" in str(e).lower() and not allow_pickle:
            msg += " (this judge loads safetensors weights only; convert the checkpoint or allow pickle)"
        raise ModelLoadError(f"judge {judge}: {msg}") from None
    model.to(judge_device()).eval()
    return model, tok


def single_token(tok: Any, word: str, judge: str, path: str) -> int:
    """The id of ``word`` if the tokenizer spells it as exactly one token, else a JudgeError."""
    ids = tok(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise JudgeError(f"judge {judge}: model '{path}' does not spell its label '{word}' as one token "
                         f"({ids}); is this the right checkpoint?")
    return ids[0]
