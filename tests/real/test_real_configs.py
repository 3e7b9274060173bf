"""Every protocol config in configs/experiments validates; the accelerate configs are well-formed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hftlab.cli import main
from hftlab.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "configs/experiments").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_validates(path, capsys):
    assert main(["validate", "-c", str(path)]) == 0, capsys.readouterr().err
    assert "Launch" in path.read_text() or "launch" in path.read_text()


def test_booster_is_the_papers_setting():
    cfg = load_config([ROOT / "configs/experiments/booster.yaml"])
    assert cfg.model.name == "meta-llama/Llama-2-7b-hf" and cfg.task == "sst2"
    assert (cfg.attack.ratio, cfg.attack.n) == (0.1, 1000)
    for stage, lr in ((cfg.align, 5e-4), (cfg.finetune, 1e-5)):
        assert stage.lora and (stage.lora_r, stage.lora_alpha) == (32, 4.0)
        assert stage.lora_targets == ["q_proj", "k_proj", "v_proj"]
        assert (stage.lr, stage.epochs, stage.batch_size) == (lr, 20.0, 10)
    assert cfg.defense.name == "booster"
    assert {k: cfg.defense.params[k] for k in ("lam", "alpha", "harmful_batch_size")} == {
        "lam": 5.0, "alpha": 0.1, "harmful_batch_size": 10}
    assert (cfg.eval.judge, cfg.eval.n_harmful) == ("beaver-dam", 1000)


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.stem for p in ACCELERATE])
def test_accelerate_config(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and data["num_processes"] >= 2
    assert "accelerate launch" in path.read_text()
