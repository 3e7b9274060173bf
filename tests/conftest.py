"""Shared fixtures: offline, one torch thread, the organism cached once per session."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HFTLAB_HOME", str(Path(__file__).resolve().parents[1] / ".hftlab"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# A fast pipeline: the real organism, tiny budgets (seconds per run).
FAST = [
    "data.alignment_n=200", "data.harmful_n=64",
    "align.max_steps=6", "align.batch_size=8",
    "finetune.max_steps=6", "finetune.batch_size=8", "attack.n=64",
    "eval.n_harmful=16", "eval.n_task=16", "eval.max_new_tokens=12",
]


@pytest.fixture(scope="session")
def organism_path() -> Path:
    from hftlab.organism.build import ensure_organism

    return ensure_organism()


@pytest.fixture(scope="session")
def organism_tokenizer(organism_path):
    from hftlab.config import ModelConfig
    from hftlab.models.loading import load_tokenizer

    return load_tokenizer(organism_path, ModelConfig())


@pytest.fixture()
def fast_overrides(tmp_path) -> list[str]:
    return [*FAST, f"out_dir={tmp_path / 'runs'}"]
