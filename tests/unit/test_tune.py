"""``hftlab tune``: grids from the paper-defaults files (the paper's setting first), the selection written
to a preset file with the grid's table, ``defense.preset=tuned`` reading it, and a real run on the organism."""
from __future__ import annotations

import pytest
import yaml

from hftlab import config, tune
from hftlab.config import ConfigError, load_config


def test_every_grid_starts_with_the_papers_setting():
    assert tune.grid("vaccine")[0] == {"rho": 2.0}
    assert tune.grid("lisa")[0] == {"rho": 1.0} and {"rho": 10.0} in tune.grid("lisa")
    sm = tune.grid("safemerge")  # a list of settings, completed with the paper's values of the other keys
    assert sm[0] == {"select": "threshold", "fraction": 10 / 64} and {"select": "number", "fraction": 0.25} in sm
    for name in tune.tunable():
        points = tune.grid(name)
        assert len(points) >= 3 and len({tuple(sorted(p.items())) for p in points}) == len(points), name
        load_config(overrides=tune._overrides(name, points[-1]))  # every point is a valid config


def test_a_defense_without_a_grid_is_a_one_line_error():
    with pytest.raises(ConfigError, match="no 'tune:' grid"):
        tune.grid("ptst")
    with pytest.raises(ConfigError, match="no paper-defaults file"):
        tune.grid("no-such-defense")


def _results(*pairs):
    return [{"harmful_score": h, "finetune_accuracy": f} for h, f in pairs]


def test_choose_and_write_the_preset(tmp_path):
    settings = [{"rho": 1.0}, {"rho": 0.1}, {"rho": 10.0}]
    results = [_results((50, 99), (60, 97)), _results((30, 96), (40, 95)), _results((0, 60), (2, 70))]
    sft = _results((70, 100), (60, 98))
    table = tune.choose("lisa", settings, results, sft)
    assert table["chosen"] == {"rho": 0.1} and not table["kept_paper"]  # rho=10 loses 34 points of FA
    assert [r["fa_kept"] for r in table["grid"]] == [True, True, False]
    path = tune.write_preset(table, [100, 101], [], tmp_path / "lisa.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["defense"] == {"name": "lisa", "rho": 0.1}
    assert data["tune"]["grid"][1]["chosen"] and data["tune"]["grid"][0]["paper"]
    assert data["tune"]["sft"] == {"hs": 65.0, "fa": 99.0}
    # the written file is a valid config (its table lives under tune:, which runs ignore)
    assert load_config([path]).defense.params["rho"] == 0.1

    none = tune.choose("lisa", settings, [_results((0, 50))] * 3, sft)
    assert none["kept_paper"] and none["chosen"] == {"rho": 1.0}


def test_preset_tuned_reads_the_file_and_explicit_values_win(tmp_path, monkeypatch):
    (tmp_path / "lisa.yaml").write_text("defense:\n  name: lisa\n  rho: 0.1\n  cycles: 10\n")
    monkeypatch.setattr(config, "tuned_preset_path", lambda name: tmp_path / f"{name}.yaml")
    cfg = load_config(overrides=["defense=lisa", "defense.preset=tuned"])
    assert cfg.defense.params["rho"] == 0.1 and cfg.defense.params["cycles"] == 10
    cfg = load_config(overrides=["defense=lisa", "defense.preset=tuned", "defense.rho=3"])
    assert cfg.defense.params["rho"] == 3 and cfg.defense.params["cycles"] == 10
    assert load_config(overrides=["defense=lisa"]).defense.params["rho"] == 1.0
    with pytest.raises(ConfigError, match="no tuned preset for defense 'vaccine'"):
        load_config(overrides=["defense=vaccine", "defense.preset=tuned"])
    with pytest.raises(ConfigError, match="defense.preset"):
        load_config(overrides=["defense=lisa", "defense.preset=best"])


def test_validation_prompts_are_disjoint_from_the_test_prompts():
    from hftlab.data.sources import get_source
    from hftlab.eval.evaluate import eval_prompts
    from hftlab.registry import get

    source, get_task = get_source("organism"), lambda name: get("task", name)()
    test = load_config().eval
    val = load_config(overrides=["eval.split=validation"]).eval
    th, tt = eval_prompts(source, get_task("sentiment"), test)
    vh, vt = eval_prompts(source, get_task("sentiment"), val)
    assert len(th) == 400 and len(vh) == 400 and len(vt) >= 300
    assert not {e.prompt for e in th} & {e.prompt for e in vh}
    assert not {e.prompt for e in tt} & {e.prompt for e in vt}


def test_tune_runs_on_the_organism(fast_overrides, tmp_path):
    """A real calibration of Safe LoRA (a repair: every point shares SFT's fine-tuning) on one seed."""
    out = tmp_path / "tuned"
    tables = tune.run_tune(["safelora"], seeds=[7], jobs=1, runs_dir=str(tmp_path / "runs"),
                           extra=[o for o in fast_overrides if not o.startswith("out_dir=")], out_root=out)
    t = tables["safelora"]
    assert len(t["grid"]) == 4 and sum(r["chosen"] for r in t["grid"]) == 1
    assert all(0 <= r["hs"] <= 100 and 0 <= r["fa"] <= 100 for r in t["grid"])
    data = yaml.safe_load((out / "safelora.yaml").read_text())
    assert data["tune"]["validation_seeds"] == [7] and data["defense"]["name"] == "safelora"


def test_a_preset_equal_to_the_papers_setting_is_recognised(tmp_path, monkeypatch):
    from hftlab.bench_suite import tuned_is_paper

    monkeypatch.setattr(config, "tuned_preset_path", lambda name: tmp_path / f"{name}.yaml")
    (tmp_path / "lisa.yaml").write_text("defense:\n  name: lisa\n  rho: 1.0\n")  # the paper's rho
    (tmp_path / "resta.yaml").write_text("defense:\n  name: resta\n  gamma: 0.25\n")
    (tmp_path / "safelora.yaml").write_text(  # a list grid: every key of the paper point must match
        "defense:\n  name: safelora\n  proj_fraction: 0.15625\n  select: threshold\n  threshold: 0.5\n")
    assert tuned_is_paper("lisa")
    assert not tuned_is_paper("resta")
    assert not tuned_is_paper("safelora")
