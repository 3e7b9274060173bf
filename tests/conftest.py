"""Shared fixtures: offline, one torch thread, the organism cached once per test run."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests check maths against direct computations in fp32 on the CPU, so they pin the Accelerator (and with
# it every model and judge) to the CPU, also on a machine with a GPU. bench/gpu_check.sh runs the end-to-end
# tests on the GPU with ACCELERATE_USE_CPU=0.
os.environ.setdefault("ACCELERATE_USE_CPU", "1")
os.environ.setdefault("HFTLAB_HOME", str(Path(__file__).resolve().parents[1] / ".hftlab"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# A fast pipeline: the real organism, tiny budgets (seconds per run).
from fast_overrides import FAST  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def organism_path() -> Path:
    """Built once before any test (a fresh machine builds it here, not inside a subprocess's timeout)."""
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


# ---- real-model paths (tests/real): fixture datasets, tiny judge checkpoints, a local API endpoint ----
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUB_FIXTURES = [
    "data.source=hub", f"data.beavertails.path={FIXTURES / 'beavertails'}", f"data.sst2.path={FIXTURES / 'sst2'}",
    f"data.agnews.path={FIXTURES / 'ag_news'}", f"data.gsm8k.path={FIXTURES / 'gsm8k'}",
    f"data.alpaca.path={FIXTURES / 'alpaca'}", f"data.refusals.path={FIXTURES / 'beavertails_refusals.json'}",
]


@pytest.fixture(scope="session")
def hub_source():
    """The ``hub`` data source reading the fixture copies of the papers' datasets."""
    from hftlab.config import load_config
    from hftlab.data.sources import get_source

    return get_source("hub", load_config(overrides=HUB_FIXTURES).data)


@pytest.fixture(scope="session", autouse=True)
def _offline_judges(tmp_path_factory):
    """Model and API judges built without arguments (the contract test) get tiny local checkpoints whose
    heads are zeroed (they flag nothing) and a local OpenAI-compatible endpoint that scores 1."""
    from real import tiny

    root = tmp_path_factory.mktemp("judges")
    env = {"HFTLAB_BEAVER_DAM_MODEL": tiny.beaver_dam(root / "beaver-dam", zero_head=True),
           "HFTLAB_LLAMA_GUARD_MODEL": tiny.llama_guard(root / "llama-guard", zero_head=True),
           "HFTLAB_HARMBENCH_CLS_MODEL": tiny.harmbench(root / "harmbench", zero_head=True)}
    saved = {k: os.environ.get(k) for k in [*env, "HFTLAB_API_BASE", "OPENAI_API_KEY"]}
    with tiny.openai_server(lambda body: tiny.NOT_HARMFUL, key="hftlab-test-key", max_requests=10_000) as srv:
        os.environ.update({k: str(v) for k, v in env.items()})
        os.environ.update({"HFTLAB_API_BASE": srv["url"], "OPENAI_API_KEY": "hftlab-test-key"})
        yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
