"""Stage hashes follow the plugins' code: an edit to a method's file (or to what it imports) is a new
result, a docstring or comment edit is not."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hftlab import registry
from hftlab.code_identity import clear_cache, code_fingerprint, code_modules

SRC = Path(__file__).resolve().parents[2] / "src" / "hftlab"


@pytest.fixture()
def pkg(tmp_path, monkeypatch):
    """A package ``fpkg`` with a module importing a helper, on sys.path."""
    root = tmp_path / "fpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "helper.py").write_text("def scale(x):\n    return 2 * x\n")
    (root / "method.py").write_text(textwrap.dedent('''\
        """A method."""
        import json
        from .helper import scale


        def loss(x):
            """Its loss."""
            return scale(x) + 1  # the +1 term
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    clear_cache()
    yield root
    clear_cache()
    for name in [m for m in sys.modules if m == "fpkg" or m.startswith("fpkg.")]:
        del sys.modules[name]


def edited(root: Path, file: str, old: str, new: str) -> str:
    path = root / file
    path.write_text(path.read_text().replace(old, new))
    clear_cache()
    return code_fingerprint("fpkg.method")


def test_follows_package_imports_only(pkg):
    assert code_modules("fpkg.method") == ["fpkg.helper", "fpkg.method"]  # not json


def test_docstrings_and_comments_keep_the_fingerprint(pkg):
    before = code_fingerprint("fpkg.method")
    assert edited(pkg, "method.py", '"""Its loss."""', '"""Its loss, reworded."""') == before
    assert edited(pkg, "method.py", "# the +1 term", "# the constant") == before


def test_code_edits_change_it(pkg):
    before = code_fingerprint("fpkg.method")
    after = edited(pkg, "method.py", "+ 1", "+ 2")
    assert after != before
    assert edited(pkg, "helper.py", "2 * x", "3 * x") not in (before, after)  # an imported module's edit


def test_registered_methods_cover_their_helpers():
    booster = code_modules("hftlab.defenses.booster")
    assert {"hftlab.defenses.perturbation", "hftlab.defenses.base"} <= set(booster)
    assert "hftlab.config" not in booster  # its values are in every hash already
    ids = {name: registry.code_id("defense", name) for name in registry.names("defense")}
    assert len(set(ids.values())) == len(ids)


def run_ids(src: Path) -> dict[str, str]:
    """run_key of a Booster and an SFT run, and their plugins' code, computed in a fresh process on ``src``."""
    code = ("import json; from hftlab.config import load_config; from hftlab.pipeline import plugin_code, run_key\n"
            "out = {}\n"
            "for d in ('booster', 'sft'):\n"
            "    cfg = load_config(overrides=[f'defense={d}'])\n"
            "    out[d] = run_key(cfg); out[d + ':code'] = plugin_code(cfg)['defense']\n"
            "print(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(src), "PATH": "", "HFTLAB_HOME": str(src / "home"),
                              "HF_HUB_OFFLINE": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_editing_a_defense_file_changes_its_run_id_only(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(SRC, src / "hftlab", ignore=shutil.ignore_patterns("__pycache__"))
    before = run_ids(src)
    booster = src / "hftlab" / "defenses" / "booster.py"
    booster.write_text(booster.read_text().replace('"""', '"""Edited docstring. ', 1))
    assert run_ids(src) == before
    booster.write_text(booster.read_text() + "\n_EDITED = 1\n")
    after = run_ids(src)
    assert after["booster"] != before["booster"] and after["booster:code"] != before["booster:code"]
    assert after["sft"] == before["sft"]
