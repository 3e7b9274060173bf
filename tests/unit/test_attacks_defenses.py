"""bench.attacks_defenses: the grid is planned on real configs (alignment shared between attacks, the
guardrail only where asked), the summary pairs each defense with SFT under the same attack, guardrail and
seed, and one small grid runs end to end on the organism (FAST)."""
from __future__ import annotations

import csv
import json

import pytest

from bench.attacks_defenses import GUARD, Key, collect, main, plan_grid, summarise
from fast_overrides import FAST
from hftlab.errors import UserError


def test_plan_grid_shares_alignment_between_attacks_and_sets_the_guardrail(tmp_path):
    grid = plan_grid(["harmful-mix", "backdoor-trigger"], ["lisa", "vaccine"], [0, 1], (False, True),
                     runs=str(tmp_path), extra=FAST)
    keys = [k for k, _ in grid]
    assert len(grid) == 2 * 2 * 3 * 2 and len(set(keys)) == len(keys)  # SFT added to the defenses
    assert {k.defense for k in keys} == {"sft", "lisa", "vaccine"}
    assert len({c.run_id for _, c in grid}) == len(grid)
    for k, c in grid:
        assert (c.cfg.attack.name, c.cfg.defense.name, c.cfg.seed) == (k.attack, k.defense, k.seed)
        assert c.cfg.guardrail.name == (GUARD if k.guard else "")
        assert c.cfg.out_dir == str(tmp_path)
    group = {k: c.align_group() for k, c in grid}
    # SFT and a fine-tuning defense share the alignment, under every attack and guardrail mode, per seed.
    for seed in (0, 1):
        same = {g for k, g in group.items() if k.seed == seed and k.defense in ("sft", "lisa")}
        assert len(same) == 1
        vaccine = {g for k, g in group.items() if k.seed == seed and k.defense == "vaccine"}
        assert len(vaccine) == 1 and vaccine != same
    assert group[Key("harmful-mix", "sft", False, 0)] != group[Key("harmful-mix", "sft", False, 1)]


def test_plan_grid_rejects_unknown_names():
    with pytest.raises(UserError, match="--attacks: unknown attack nope"):
        plan_grid(["nope"], ["sft"], [0])
    with pytest.raises(UserError, match="--defenses: unknown defense vacine"):
        plan_grid(["harmful-mix"], ["vacine"], [0])


def _result(hs: float, fa: float, trigger_hs: float | None = None, leakage: float | None = None) -> dict:
    metrics: dict = {}
    if trigger_hs is not None:
        metrics["views"] = {"trigger": {"harmful_score": trigger_hs, "finetune_accuracy": 0.0}}
    if leakage is not None:
        metrics["guardrail"] = {"leakage": leakage, "benign_dropped": 0.0, "n_kept": 900}
    return {"harmful_score": hs, "finetune_accuracy": fa, "metrics": metrics}


def test_summary_pairs_with_sft_under_the_same_attack_guardrail_and_seed():
    results = {
        Key("backdoor-trigger", "sft", False, 0): _result(20, 90, trigger_hs=70),
        Key("backdoor-trigger", "sft", False, 1): _result(10, 80, trigger_hs=50),
        Key("backdoor-trigger", "lisa", False, 0): _result(10, 89, trigger_hs=40),
        Key("backdoor-trigger", "lisa", False, 1): _result(6, 79, trigger_hs=22),
        Key("backdoor-trigger", "lisa", False, 2): _result(0, 0, trigger_hs=0),  # no SFT at seed 2: unpaired
        Key("backdoor-trigger", "sft", True, 0): _result(0, 95, trigger_hs=1, leakage=0.0),
        Key("backdoor-trigger", "lisa", True, 0): _result(0, 90, trigger_hs=3, leakage=2.0),
    }
    rows = {(r["guard"], r["defense"]): r for r in summarise(results)}
    lisa = rows[(False, "lisa")]
    assert lisa["d_hs_attacker"].mean == pytest.approx(-29.0)  # (40-70 + 22-50) / 2, seed 2 unpaired
    assert lisa["d_hs_attacker"].n == 2 and lisa["d_hs_attacker"].hi < 0
    assert lisa["d_hs"].mean == pytest.approx(-7.0) and lisa["d_fa"].mean == pytest.approx(-1.0)
    assert lisa["hs_attacker"] == pytest.approx((40 + 22 + 0) / 3)
    assert lisa["verdict"] == "lowers HS"
    assert rows[(True, "lisa")]["d_hs_attacker"].mean == pytest.approx(2.0)  # vs SFT with the guardrail
    assert rows[(True, "lisa")]["leakage"] == 2.0 and rows[(False, "sft")]["leakage"] is None
    assert "d_hs" not in rows[(False, "sft")]


def test_small_grid_runs_end_to_end_and_writes_the_tables(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    argv = ["--jobs", "1", "--seeds", "0", "--attacks", "backdoor-trigger", "--defenses", "sft,safeinstr",
            "--guardrail", "on", "--runs", str(runs), "--out", str(out), *FAST]
    main(argv)
    with open(out / "per_seed.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["defense"] for r in rows) == ["safeinstr", "sft"]
    for r in rows:
        run = json.loads((runs / "runs" / r["run id"] / "result.json").read_text())
        assert float(r["HS"]) == pytest.approx(run["harmful_score"], abs=0.05)
        assert float(r["attacker HS"]) == pytest.approx(run["metrics"]["views"]["trigger"]["harmful_score"], abs=0.05)
        assert float(r["leakage"]) == pytest.approx(run["metrics"]["guardrail"]["leakage"], abs=0.05)
        assert r["code"] == "current"
    table = (out / "table.md").read_text()
    assert "backdoor-trigger (trigger)" in table and "(1 seed)" in table
    # Everything is cached: a second pass (tables only) finds the same two cells without running any.
    grid = plan_grid(["backdoor-trigger"], ["safeinstr"], [0], (True,), str(runs), FAST)
    assert len(collect(grid, run=False)) == 2


def test_a_run_of_the_same_config_under_other_code_or_an_old_parameter_name_is_found(tmp_path):
    from hftlab.pipeline import experiment

    (key, cell), = plan_grid(["virus"], ["sft"], [0], (True,), str(tmp_path), FAST)
    config = experiment(cell.cfg)
    params = config["attack"]["params"]
    config["attack"]["params"] = {("lamb" if k == "lam" else k): v for k, v in params.items()}
    assert "lamb" in config["attack"]["params"]  # the name Virus's λ was stored under before
    folder = tmp_path / "runs" / "0123456789ab"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({**_result(1.5, 90.0, leakage=20.0), "config": config}))
    found = collect([(key, cell)], run=False)
    assert found[key]["harmful_score"] == 1.5 and found[key]["other_code"] is True
    config["attack"]["params"]["steps"] += 1  # another setting is not the same cell
    (folder / "result.json").write_text(json.dumps({**_result(1.5, 90.0), "config": config}))
    assert collect([(key, cell)], run=False) == {}
