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
