"""What a newcomer meets first: the help text, shipped configs by name, the report's rows, file modes,
warnings, the run folder's links to its stages and the scoring of the benign set."""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import pytest

from hftlab import artifacts
from hftlab.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


# ---- 1. the help text
def test_help_is_plain_text_and_names_every_subcommand():
    from hftlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.add_parser("added-later", help="a subcommand added after the others")
    text = parser.format_help()
    assert "``" not in text
    description = text.split("\n\n")[1]
    assert set(sub.choices) >= {"run", "sweep", "bench", "report", "list", "validate", "added-later"}
    for name in sub.choices:
        assert name in description, name
    assert "Commands:" not in sub.choices["run"].format_help()  # a subcommand keeps its own help


# ---- 2. shipped configs by name
def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_config_names_resolve_against_the_shipped_folder(tmp_path, monkeypatch):
    from hftlab.config_files import find_config

    root = _tree(tmp_path / "shipped", {"defenses/lisa.yaml": "defense: lisa\n", "experiments/lisa.yaml": "seed: 1\n",
                                        "organism/tuned/ptst.yaml": "defense: ptst\n", "accelerate/ddp.yaml": "x: 1\n"})
    monkeypatch.chdir(tmp_path)
    assert find_config("defenses/lisa", root) == root / "defenses/lisa.yaml"
    assert find_config("defenses/lisa.yaml", root) == root / "defenses/lisa.yaml"
    assert find_config("ptst", root) == root / "organism/tuned/ptst.yaml"
    assert find_config("tuned/ptst", root) == root / "organism/tuned/ptst.yaml"
    with pytest.raises(ConfigError, match="ambiguous.*defenses/lisa, experiments/lisa"):
        find_config("lisa", root)
    with pytest.raises(ConfigError, match=r"'ddp' not found.*defenses/, experiments/, organism/tuned/"):
        find_config("ddp", root)  # Accelerate's launch configs are not found by name
    (tmp_path / "lisa.yaml").write_text("seed: 3\n")
    assert find_config("lisa.yaml", root) == Path("lisa.yaml")  # a real path always wins


def test_shipped_configs_load_from_any_folder(tmp_path, monkeypatch):
    from hftlab.config_files import SHIPPED

    assert SHIPPED.resolve() == (ROOT / "configs").resolve()  # src/hftlab/configs links to configs/
    monkeypatch.chdir(tmp_path)
    assert load_config(["defenses/lisa"]).defense.name == "lisa"
    assert load_config(["experiments/sft"]).task == "sst2"  # its ``base:`` is found next to it
    with pytest.raises(ConfigError, match=f"'nope' not found.*{SHIPPED}"):
        load_config(["nope"])


# ---- 3. the report's rows
def _row(defense: str, params: dict, ratio: float, seed: int, hs: float) -> dict:
    return {"defense": defense, "attack": "harmful-mix", "task": "sentiment", "model": "organism:abc", "ratio": ratio,
            "n": 1000, "seed": seed, "harmful_score": hs, "finetune_accuracy": 90.0,
            "config": {"defense": {"name": defense, "params": params}, "attack": {"name": "harmful-mix", "ratio": ratio},
                       "seed": seed}}


def test_report_rows_are_sorted_and_params_are_per_defense():
    from hftlab.report import report_groups, summarise

    rows = [_row("vaccine", {"rho": 2.0}, 0.2, 0, 50.0), _row("sft", {}, 0.1, 0, 70.0),
            _row("vaccine", {"rho": 5.0}, 0.1, 0, 40.0), _row("lisa", {"rho": 1.0}, 0.1, 0, 30.0),
            _row("vaccine", {"rho": 2.0}, 0.1, 1, 60.0), _row("vaccine", {"rho": 2.0}, 0.1, 0, 62.0)]
    header, body = summarise(rows, report_groups(rows))
    assert "defense.rho" not in header and "params" in header
    got = [(b[header.index("defense")], b[header.index("ratio")], b[header.index("params")], b[-1]) for b in body]
    assert got == [("lisa", "0.1", "rho=1.0", "1"), ("sft", "0.1", "", "1"), ("vaccine", "0.1", "rho=2.0", "2"),
                   ("vaccine", "0.1", "rho=5.0", "1"), ("vaccine", "0.2", "rho=2.0", "1")]
    assert summarise(list(reversed(rows)), report_groups(rows)) == (header, body)  # input order does not matter


def test_report_by_defense_keeps_ratios_apart_unless_asked():
    from hftlab.report import report_groups, summarise

    rows = [_row("sft", {}, r, s, hs) for r, s, hs in [(0.1, 0, 60.0), (0.1, 1, 70.0), (0.2, 0, 90.0)]]
    header, body = summarise(rows, report_groups(rows, by=["defense"]))
    assert header[0] == "defense" and [(b[header.index("ratio")], b[-1]) for b in body] == [("0.1", "2"), ("0.2", "1")]
    header, body = summarise(rows, report_groups(rows, by=["defense"], average_over=["ratio"]))
    assert "ratio" not in header and len(body) == 1 and body[0][-1] == "3"
    assert body[0][header.index("harmful_score")] == "73.3 ± 15.3"


# ---- 4. file modes
def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    artifacts._umask.cache_clear()
    try:
        artifacts.write_json(tmp_path / "manifest.json", {"a": 1})
        assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o640
        weights = tmp_path / "model.safetensors"
        weights.write_bytes(b"x")
        weights.chmod(0o600)  # as safetensors leaves it
        artifacts.follow_umask(tmp_path)
        assert weights.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
        artifacts._umask.cache_clear()
    artifacts.write_json(tmp_path / "result.json", {})
    assert (tmp_path / "result.json").stat().st_mode & 0o777 == 0o666 & ~old


# ---- 5. warnings
def test_lora_wrapping_raises_no_warning():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hftlab.config import TrainConfig
    from hftlab.models.loading import add_lora

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora = add_lora(model, TrainConfig(lora=True))
    assert any("lora_" in n for n, _ in lora.named_parameters())


# ---- 7. the run folder names its stages
def test_run_folder_links_its_stages(tmp_path):
    run_dir = tmp_path / "runs" / "abc"
    run_dir.mkdir(parents=True)
    (tmp_path / "align" / "h1").mkdir(parents=True)
    (tmp_path / "evaluate" / "h2").mkdir(parents=True)
    artifacts.link_stages(run_dir, [("align", "../../align/h1"), ("evaluate", "../../evaluate/h2")])
    artifacts.link_stages(run_dir, [("align", "../../align/h1"), ("evaluate", "../../evaluate/h2")])  # rerun
    assert (run_dir / "align").resolve() == (tmp_path / "align" / "h1").resolve()
    assert os.readlink(run_dir / "evaluate") == "../../evaluate/h2"


# ---- 8. every benign item with a right answer is scored
def test_every_benign_item_with_an_answer_is_scored():
    """The benign set's task items (half of it) were left unscored: they are scored by their task's rule."""
    from hftlab.eval.evaluate import judge_generations
    from hftlab.tasks.organism_tasks import Sentiment

    def benign(kind, category, target, reference, response):
        return {"set": "benign", "prompt": "p", "response": response, "target": target, "category": category,
                "system": "", "reference": reference, "kind": kind}

    rows = [benign("task", "sentiment", "positive", "positive", "positive ."),
            benign("task", "topic", "sports", "sports", "business"),
            benign("task", "arithmetic", "7", "x the final answer is : 7", "so the final answer is : 7"),
            benign("chat", "", "", "the sky is blue .", "the sky is blue ."),
            benign("chat", "", "", "the sky is blue .", "the sky is red ."),
            benign("chat", "", "", "", "anything")]
    scores, metrics = judge_generations(rows, "organism", Sentiment())
    assert [s["correct"] for s in scores] == [True, False, True, True, False, None]
    assert metrics["benign_task_accuracy"] == pytest.approx(200 / 3)
    assert metrics["benign_accuracy"] == 50.0  # the chat items, as before
