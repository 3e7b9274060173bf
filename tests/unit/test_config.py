"""Config schema, overrides and strict validation: every bad value is one line naming key and origin."""
from __future__ import annotations

import pytest

from hftlab.config import ConfigError, load_config


def test_defaults_run_on_the_organism():
    cfg = load_config()
    assert cfg.model.name == "organism" and cfg.defense.name == "sft" and cfg.attack.name == "harmful-mix"
    assert cfg.eval.judge == "organism"


def test_dotted_overrides_and_shorthands():
    cfg = load_config(overrides=["attack.ratio=0.2", "attack.n=500", "finetune.lr=1e-4",
                                 "finetune.lora=false", "seed=3", "attack=pure-harmful"])
    assert cfg.attack.ratio == 0.2 and cfg.attack.n == 500 and cfg.finetune.lr == 1e-4
    assert cfg.finetune.lora is False and cfg.seed == 3 and cfg.attack.name == "pure-harmful"


def test_defense_params_hold_every_default(monkeypatch):
    """A defense's resolved params include its defaults, so a changed default changes the stage and run
    hashes (a cached result of the old default is not reused)."""
    from dataclasses import dataclass

    from hftlab.config import to_dict
    from hftlab.defenses import booster

    cfg = load_config(overrides=["defense=booster", "defense.lam=1"])
    assert cfg.defense.params == {"lam": 1.0, "alpha": 0.1, "perturb_aware": False, "rho": 5.0,
                                  "harmful_batch_size": 10}
    before = to_dict(cfg)

    @dataclass
    class NewDefault(booster.Config):
        harmful_batch_size: int = 32

    monkeypatch.setattr(booster.Booster, "Config", NewDefault)
    after = to_dict(load_config(overrides=["defense=booster", "defense.lam=1"]))
    assert after["defense"]["params"]["harmful_batch_size"] == 32 and after != before


def test_renamed_parameter_is_accepted_with_a_warning(caplog):
    """λ was ``lamb`` in Booster and the virus attack: the old key still sets ``lam``, with one warning."""
    cfg = load_config(overrides=["defense=booster", "defense.lamb=2"])
    assert cfg.defense.params["lam"] == 2.0 and "lamb" not in cfg.defense.params
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "defense.lamb is deprecated: use defense.lam (command line)"]
    with pytest.raises(ConfigError, match="defense.lamb: unknown parameter"):  # only where the new name exists
        load_config(overrides=["defense=vaccine", "defense.lamb=2"])


def test_yaml_file_and_override_precedence(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("attack:\n  ratio: 0.05\nfinetune:\n  epochs: 3\n")
    cfg = load_config([f], ["finetune.epochs=5"])
    assert cfg.attack.ratio == 0.05 and cfg.finetune.epochs == 5.0


@pytest.mark.parametrize("override, words", [
    ("attack.ratio=1.5", ["attack.ratio", "out of range", "command line"]),
    ("attack.n=-3", ["attack.n", "out of range"]),
    ("finetune.lora=maybe", ["finetune.lora", "true/false"]),
    ("finetune.lr=fast", ["finetune.lr", "number"]),
    ("finetune.bogus=1", ["finetune.bogus", "unknown key"]),
    ("defense=nope", ["defense", "unknown defense 'nope'"]),
    ("attack=nope", ["attack", "unknown attack"]),
    ("eval.judge=nope", ["eval.judge", "unknown judge"]),
    ("finetune.schedule=wavy", ["finetune.schedule", "not one of"]),
    ("defense.rho=1", ["defense.rho", "unknown parameter", "sft"]),
    ("noequals", ["expected KEY=VALUE"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("attack:\n  ratio: 0.1\n  n: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config([f])
    g = tmp_path / "typo.yaml"
    g.write_text("seed: 1\nfinetune:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"finetune\.epoch: unknown key .*typo\.yaml:3"):
        load_config([g])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
