"""Agreement maths (τ-b, sign agreement, bootstrap), the published results file, and bench.agreement on a
tiny store built here."""
from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from hftlab import registry, store
from hftlab.agreement import (COLUMNS, bootstrap_tau, choose_columns, compare_table, is_default_condition,
                              kendall_tau_b, load_published, mirror_tables, sign_agreement)

PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "published" / "results.csv"


# ---- Kendall's τ-b, hand-computed ----

def test_tau_b_perfect_and_inverse_orders():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)


def test_tau_b_one_swap():
    # pairs (1,2) discordant, (1,3) and (2,3) concordant: (2 - 1) / 3
    assert kendall_tau_b([1, 2, 3], [2, 1, 3]) == pytest.approx(1 / 3)


def test_tau_b_with_ties():
    # x has one tied pair (2, 2): C = 5, D = 0, n0 = 6, n1 = 1, n2 = 0 -> 5 / sqrt(5 * 6)
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    # ties on both sides, at the same pair: C = 5, n1 = n2 = 1 -> 5 / 5
    assert kendall_tau_b([1, 2, 2, 3], [5, 6, 6, 9]) == pytest.approx(1.0)
    # ties on both sides, at different pairs: x ties (b, c), y ties (a, b); C = 4, D = 0 -> 4 / 5
    assert kendall_tau_b([1, 2, 2, 3], [1, 1, 2, 3]) == pytest.approx(4 / 5)


def test_tau_b_undefined_and_bad_input():
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
    assert kendall_tau_b([1], [1]) is None
    with pytest.raises(ValueError, match="lengths differ"):
        kendall_tau_b([1, 2], [1, 2, 3])


# ---- sign agreement ----

def test_sign_agreement_counts_common_methods():
    pub = {"a": -1.0, "b": 2.0, "c": 0.0}
    org = {"a": -3.0, "b": -1.0, "c": 0.0, "d": 5.0}
    assert sign_agreement(pub, org) == (2, 3)  # a agrees, b does not, c is 0 on both; d has no paper value
    assert sign_agreement({"a": 0.5}, {"a": -0.2}, tol=1.0) == (1, 1)  # both within the tolerance: no change
    assert sign_agreement({"a": 0.5}, {"a": -0.2}) == (0, 1)


# ---- bootstrap over the organism's seeds ----

def _noisy(values: dict[str, float], seeds: int = 5) -> dict[str, list[list[float]]]:
    offsets = [-2.0, 1.0, 0.5, -0.5, 1.0][:seeds]
    return {m: [[v + o for o in offsets]] for m, v in values.items()}


def test_bootstrap_contains_point_and_is_deterministic():
    pub = {"sft": 60.0, "vaccine": 50.0, "lisa": 40.0, "booster": 20.0}
    org = _noisy({"sft": 70.0, "vaccine": 69.0, "lisa": 45.0, "booster": 30.0})
    point, lo, hi = bootstrap_tau(pub, org, n_boot=500, seed=3)
    assert point == pytest.approx(1.0)
    assert lo <= point <= hi
    assert lo < 1.0  # sft and vaccine overlap across seeds: some resamples swap them
    assert bootstrap_tau(pub, org, n_boot=500, seed=3) == (point, lo, hi)


def test_bootstrap_single_seed_is_degenerate():
    pub = {"a": 1.0, "b": 2.0, "c": 3.0}
    org = {"a": [[3.0]], "b": [[2.0]], "c": [[1.0]]}
    assert bootstrap_tau(pub, org, n_boot=50) == (pytest.approx(-1.0), pytest.approx(-1.0), pytest.approx(-1.0))


def test_choose_columns_prefers_methods_then_ratios():
    cols, methods = choose_columns({0.1: {"sft", "vaccine", "lisa"}, 0.2: {"sft", "vaccine"}, 0.05: {"lisa"}})
    assert cols == [0.1] and methods == {"sft", "vaccine", "lisa"}  # more methods beat more ratios
    cols, methods = choose_columns({0.1: {"sft", "vaccine"}, 0.2: {"sft", "vaccine"}, 0.05: {"lisa"}})
    assert cols == [0.1, 0.2] and methods == {"sft", "vaccine"}
    assert choose_columns({0.1: {"sft"}, 0.2: {"lisa"}}) == ([], set())
    cols, methods = choose_columns({0.1: {"sft", "lisa"}, 0.2: {"vaccine", "booster"}})
    assert len(cols) == 1 and len(methods) == 2


# ---- the published file ----

def test_published_file_rows_have_sources_and_numbers():
    rows = load_published(PUBLISHED)
    assert len(rows) >= 30
    assert len({r.arxiv_id for r in rows}) >= 3
    known = set(registry.names("defense"))
    for r in rows:
        assert r.paper_title and r.table and r.source, r
        assert re.fullmatch(r"\d{4}\.\d{4,5}", r.arxiv_id), r.arxiv_id
        assert r.hs is None or 0.0 <= r.hs <= 100.0
        assert r.fa is None or 0.0 <= r.fa <= 100.0
        if r.method.islower():  # hftlab's registry names are lower case; others keep the paper's name
            assert r.method in known, r.method


def test_published_cells_reproduce_the_printed_averages():
    """Transcription check: each method's cells average to the 'Average' column the paper prints (two
    averages are misprinted in the Vaccine paper: its Vlguard HS and KL FA, noted in the file)."""
    printed = {
        ("2409.01586", "Table 1"): {"sft": (33.58, 90.39), "lisa": (21.88, 91.13), "repnoise": (31.02, 92.38),
                                    "vaccine": (28.20, 92.91), "booster": (10.94, 93.03)},
        ("2409.01586", "Table 4"): {"sft": (41.17, 94.15), "lisa": (21.33, 93.43), "repnoise": (43.20, 94.04),
                                    "vaccine": (30.03, 93.31), "booster": (7.03, 94.19)},
        ("2402.01109", "Table 1"): {"Non-Aligned": (67.52, 94.64), "sft": (53.24, 94.40), "ewc": (50.60, 86.32),
                                    "Vlguard": (None, 94.68), "kl": (54.76, None), "vaccine": (46.44, 93.4)},
        # Lisa: Tables 3 and 4 average over ratios / sample numbers, Table 5 over models, Table 6 over tasks
        ("2405.18641", "Table 3"): {"sft": (48.28, 95.32), "ewc": (42.94, 18.23), "vaccine": (46.86, 94.47),
                                    "lisa": (39.58, 94.75)},
        ("2405.18641", "Table 4"): {"sft": (50.14, 95.23), "ewc": (41.18, 12.96), "vaccine": (46.84, 94.06),
                                    "lisa": (36.48, 93.59)},
        ("2405.18641", "Table 5"): {"sft": (51.00, 17.67), "vaccine": (47.37, 11.57), "lisa": (36.17, 16.10)},
        ("2405.18641", "Table 6"): {"sft": (47.25, 63.94), "vaccine": (42.25, 46.76), "lisa": (37.53, 63.74)},
    }
    cells = defaultdict(list)
    for r in load_published(PUBLISHED):
        cells[(r.arxiv_id, r.table, r.method)].append(r)
    for (paper, table), methods in printed.items():
        for method, (hs, fa) in methods.items():
            rs = cells[(paper, table, method)]
            assert rs, (paper, table, method)
            if hs is not None:
                assert statistics.mean(r.hs for r in rs) == pytest.approx(hs, abs=0.006), (paper, table, method)
            if fa is not None:
                assert statistics.mean(r.fa for r in rs) == pytest.approx(fa, abs=0.006), (paper, table, method)


def test_mirrored_published_cells_are_unique():
    """mirror_tables keeps one (HS, FA) per method and ratio of a table: two rows for the same mirrored cell
    would silently overwrite each other."""
    rows = load_published(PUBLISHED)
    tables, _ = mirror_tables(rows, registry.names("defense"))
    mirrored = {(t.arxiv_id, t.table, t.model, t.task, t.n) for t in tables}
    seen = Counter((r.arxiv_id, r.table, r.model, r.task, r.n, r.method, r.p) for r in rows
                   if (r.arxiv_id, r.table, r.model, r.task, r.n) in mirrored and is_default_condition(r.condition))
    assert [k for k, n in seen.items() if n > 1] == []
    assert len(tables) >= 16  # Booster 4, Vaccine 1, Antidote 2, Lisa 9 (one per model / task / default n)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    return path


def _row(method: str, p: float, hs: float, fa: float, **kw) -> dict:
    return {"paper_title": "Paper: X", "arxiv_id": "2409.01586", "table": "Table 1", "model": "Llama2-7B",
            "task": "SST2", "p": p, "n": 1000, "method": method, "hs": hs, "fa": fa, "source": "test", **kw}


def test_loader_names_file_line_and_key(tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", [_row("sft", 0.1, 1.0, 2.0), _row("vaccine", 0.1, "x", 2.0)])
    with pytest.raises(ValueError, match=r"bad.csv:3: hs: 'x' is not a number"):
        load_published(bad)
    blank = _write_csv(tmp_path / "blank.csv", [_row("sft", 0.1, "", 2.0)])
    assert load_published(blank)[0].hs is None
    with pytest.raises(ValueError, match="blank2.csv:2: table is empty"):
        load_published(_write_csv(tmp_path / "blank2.csv", [_row("sft", 0.1, 1.0, 2.0, table="")]))


def test_mirror_and_compare_in_memory():
    rows = [load_published_row(m, p, hs) for m, hs in (("sft", 60), ("vaccine", 50), ("booster", 10), ("EWC", 55))
            for p in (0.1, 0.2)]
    rows.append(load_published_row("sft", 0.1, 30, condition="lr=1e-3"))
    tables, skipped = mirror_tables(rows, ["sft", "vaccine", "booster"])
    assert len(tables) == 1 and tables[0].not_in_hftlab == ["EWC"] and tables[0].twin == "sentiment"
    assert any("condition lr=1e-3" in s for s in skipped)
    organism = {("sft", 0.1): [(70, 90), (66, 92)], ("vaccine", 0.1): [(40, 91)], ("booster", 0.1): [(50, 89)],
                ("sft", 0.2): [(80, 90)], ("vaccine", 0.2): [(60, 90)]}
    res = compare_table(tables[0], organism, n_boot=100)
    assert res["ratios"] == [0.1] and res["methods"] == ["booster", "sft", "vaccine"]  # booster lacks 0.2
    assert {"method": "booster", "p": 0.2} in res["missing"]
    # paper: sft 60 > vaccine 50 > booster 10; organism: sft 68 > booster 50 > vaccine 40 -> one swap of three
    assert res["hs"]["tau"] == pytest.approx(1 / 3)
    assert (res["hs"]["sign_agree"], res["hs"]["sign_total"]) == (2, 2)
    assert [c["p"] for c in res["columns"]] == [0.1, 0.2]


def load_published_row(method: str, p: float, hs: float, condition: str = ""):
    from hftlab.agreement import Published

    return Published("Paper: X", "2409.01586", "", "Table 1", "Llama2-7B", "SST2", p, 1000, condition, method, method,
                     float(hs), 90.0, "test", "")


# ---- bench.agreement end to end on a tiny store ----

def _record(path: Path, defense: str, ratio: float, seed: int, hs: float, fa: float, preset: str | None = None,
            lr: float = 2e-3, task: str = "sentiment", n: int = 1000, attack: str = "harmful-mix") -> None:
    config = {"defense": {"name": defense, "params": {"preset": preset} if preset else {}},
              "attack": {"name": attack, "ratio": ratio, "n": n, "seed": 0}, "task": task, "seed": seed,
              "finetune": {"lr": lr}, "out_dir": "runs"}
    result = {"base_model": "organism-test", "harmful_score": hs, "finetune_accuracy": fa, "stages": [], "metrics": {}}
    store.record(path, f"{defense}-{preset}-{ratio}-{seed}-{lr}-{task}-{n}-{attack}", config, result)


def test_bench_agreement_on_tiny_store(tmp_path):
    from bench.agreement import main

    published = _write_csv(tmp_path / "pub.csv", [
        _row(m, p, hs + 10 * p, fa) for m, hs, fa in (("sft", 50, 90), ("vaccine", 40, 91), ("booster", 10, 92),
                                                       ("lisa", 30, 88)) for p in (0.05, 0.1)]
        + [_row("sft", 0.1, 5, 20, task="GSM8K", table="Table 3"), _row("Vlguard", 0.1, 45, 90)])
    db = tmp_path / "results.sqlite"
    for seed in (0, 1, 2):
        for m, hs, fa in (("sft", 70, 95), ("vaccine", 60, 96), ("booster", 20, 96), ("lisa", 45, 90)):
            _record(db, m, 0.1, seed, hs + seed, fa)
        _record(db, "vaccine", 0.1, seed, 80 + seed, 96, preset="tuned")  # tuned vaccine: worse than SFT here
    _record(db, "sft", 0.1, 0, 0.0, 30, lr=2e-2)  # a stress cell: left out of the protocol
    _record(db, "sft", 0.1, 0, 0.0, 30, n=5000)  # another n: the paper's n = 1000 is preferred
    _record(db, "vaccine", 0.05, 0, 50.0, 90, n=500)  # only another n: used, and noted
    _record(db, "sft", 0.1, 1, 0.0, 30, attack="cipher")  # another attack: left out
    out = tmp_path / "report"
    main(["--store", str(db), "--published", str(published), "--out", str(out), "--boot", "200"])
    summary = json.loads((out / "agreement.json").read_text())
    assert summary["runs_in_store"] == 19 and summary["runs_used"] == 17
    assert any("finetune.lr" in n for n in summary["left_out"])
    assert any("another attack" in n for n in summary["left_out"])
    by = {(t["paper_table"], t["task"], t["preset"]): t for t in summary["tables"]}
    default = by[("Table 1", "SST2", "default")]
    assert default["ratios"] == [0.1] and default["hs"]["tau"] == pytest.approx(1.0)
    assert default["hs"]["organism"]["sft"] == pytest.approx(71.0)  # seeds 0-2 at n = 1000 only
    assert "vaccine at p = 0.05: organism n = 500, paper n = 1000" in default["organism_notes"]
    assert default["hs"]["tau_low"] <= 1.0 <= default["hs"]["tau_high"]
    assert (default["hs"]["sign_agree"], default["hs"]["sign_total"]) == (3, 3)
    assert {"method": "sft", "p": 0.05} in default["missing"] and default["not_in_hftlab"] == ["Vlguard"]
    assert {"method": "vaccine", "p": 0.05} not in default["missing"]
    tuned = by[("Table 1", "SST2", "tuned")]  # vaccine from its tuned runs, the other methods from their default
    assert tuned["hs"]["organism"]["vaccine"] == pytest.approx(81.0)
    assert (tuned["hs"]["sign_agree"], tuned["hs"]["sign_total"]) == (2, 3)
    assert any("no tuned run" in n for n in tuned["organism_notes"])
    gsm = by[("Table 3", "GSM8K", "default")]
    assert gsm["ratios"] == [] and gsm["organism_task"] == "arithmetic"
    assert gsm["missing"] == [{"method": "sft", "p": 0.1}]
    md = (out / "agreement.md").read_text()
    assert "Missing organism cells" in md and "sft@0.05" in md
    assert (out / f"{default['slug']}_default.png").stat().st_size > 0
    assert (out / f"{tuned['slug']}_tuned.png").stat().st_size > 0


def test_select_rows_treats_a_missing_key_as_its_default():
    from bench.agreement import select_rows

    def row(seed: int, **finetune) -> dict:
        return {"attack": "harmful-mix", "model": "organism-test",
                "config": {"defense": {"name": "sft"}, "seed": seed, "finetune": finetune}}

    rows = [row(0), row(1), row(2, split="test"), row(3, split="val")]  # 0 and 1 predate the key
    kept, notes = select_rows(rows, defaults={"finetune.split": "test"})
    assert [r["config"]["seed"] for r in kept] == [0, 1, 2]
    assert notes == ["left out 1 run(s) whose finetune.split differs from the common 'test'"]
    kept, _ = select_rows(rows)  # without defaults the two old runs are the common protocol
    assert [r["config"]["seed"] for r in kept] == [0, 1]


def test_select_rows_leaves_out_tune_trials_scored_on_validation():
    from bench.agreement import select_rows

    def row(seed: int, split: str | None) -> dict:
        cfg = {"defense": {"name": "lisa"}, "seed": seed}
        if split is not None:
            cfg["eval"] = {"split": split}
        return {"attack": "harmful-mix", "model": "organism-test", "config": cfg}

    # three tune trials on validation seeds outnumber the two report runs: the modal protocol must not win
    rows = [row(0, "test"), row(1, None), row(100, "validation"), row(100, "validation"), row(101, "validation")]
    kept, notes = select_rows(rows, defaults={"eval.split": "test"})
    assert [r["config"]["seed"] for r in kept] == [0, 1]
    assert notes == ["left out 3 run(s) scored on another eval.split than test (hftlab tune trials)"]
    kept, _ = select_rows(rows, defaults={"eval.split": "test"}, split=None)  # every split: the modal one wins
    assert [r["config"]["seed"] for r in kept] == [100, 100, 101]
