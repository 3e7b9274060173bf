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
