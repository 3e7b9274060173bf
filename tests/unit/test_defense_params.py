"""Plugin parameters, once for every registered defense and attack (table-driven from the registry).

- Every ``configs/defenses/<name>.yaml`` sets the defense's paper defaults: each key its ``defense:``
  section sets equals the default of the defense's ``Config`` (the YAML may also hold ``tune:`` and
  ``base:``; only the keys it sets are compared).
- The bad-parameter contract: an unknown key (also through ``hftlab validate``: exit status 2, one line),
  a wrong type and a value outside each bound or choice each give a one-line ConfigError naming the
  key, derived from each plugin's ``Config``; and what only a plugin's ``check()`` rejects (list
  shapes, combinations), listed per plugin below.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from hftlab import registry
from hftlab.cli import main
from hftlab.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "defenses"


def _yaml_cases() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_cases(), ids=lambda p: p.stem)
def test_yaml_defaults_equal_the_config_defaults(path):
    section = (yaml.safe_load(path.read_text()) or {}).get("defense") or {}
    name = section["name"]
    assert name == path.stem, f"{path.name} configures '{name}'"
    params = load_config([path]).defense.params  # the YAML's values, checked and coerced like any run's
    defaults = dataclasses.asdict(registry.get("defense", name).Config())
    set_here = [k for k in section if k != "name"]
    differ = {k: (params[k], defaults[k]) for k in set_here if params[k] != defaults[k]}
    assert not differ, f"{path.name}: (yaml, Config default) differ: {differ}"


def _plugins() -> list[tuple[str, str, type]]:
    out = []
    for kind in ("defense", "attack"):
        for name in registry.names(kind):
            schema = getattr(registry.get(kind, name), "Config", None)
            if schema is not None and dataclasses.fields(schema):
                out.append((kind, name, schema))
    return out


def _generic_cases() -> list[tuple[str, str, str, str]]:
    """(kind, name, key, value): an unknown key, a wrong type and an out-of-range value per plugin."""
    cases = []
    for kind, name, schema in _plugins():
        hints = typing.get_type_hints(schema)
        fields = dataclasses.fields(schema)
        cases.append((kind, name, "no_such_param", "1"))
        typed = [f for f in fields if hints[f.name] in (int, float, bool)]
        if typed:
            cases.append((kind, name, typed[0].name, "abc"))
        for f in fields:  # every bound: a copy-pasted field that lost its bound fails here
            lo, hi = f.metadata.get("range", (None, None))
            if lo is not None or hi is not None:
                bad = lo - 1 if lo is not None else hi + 1
                cases.append((kind, name, f.name, str(int(bad) if hints[f.name] is int else float(bad))))
            if "choices" in f.metadata:
                cases.append((kind, name, f.name, "not-a-choice"))
    return cases


GENERIC = _generic_cases()


@pytest.mark.parametrize("kind, name, key, value", GENERIC, ids=[f"{c[1]}.{c[2]}={c[3]}" for c in GENERIC])
def test_bad_parameters_are_one_line_errors(kind, name, key, value, capsys):
    override = f"{kind}.{key}={value}"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{kind}={name}", override])
    msg = str(err.value)
    assert msg.startswith(f"{kind}.{key}") and "\n" not in msg, msg
    if key != "no_such_param":
        return
    assert main(["validate", f"{kind}={name}", override]) == 2  # the command line prints that one line
    out = capsys.readouterr().err.strip()
    assert f"{kind}.{key}" in out and len(out.splitlines()) == 1, out


# what the generic cases cannot derive: string formats, list shapes, check() combinations, a float for an
# integer: (plugin, overrides, the key the one-line error names, words it must hold)
SPECIFIC = [
    ("freeze", ["defense.layers=3-1"], "defense.layers", ""),
    ("ptst", ["defense.serve_system=' '"], "defense.serve_system", "non-empty"),
    ("ptst", ["defense.train_system=you are safe", "defense.serve_system=you are safe"], "defense.serve_system",
     "equals train_system"),
    ("safeinstr", ["defense.ratio=0"], "defense.ratio", "no safety samples"),
    ("safeinstr", ["defense.kinds=[refusal,harmful]"], "defense.kinds", "harmful"),
    ("safelora", ["defense.num_proj_layers=1.5"], "defense.num_proj_layers", ""),
    ("safemerge", ["defense.weights=[0.8]"], "defense.weights", ""),
    ("safemerge", ["defense.weights=[1.5, 0.2]"], "defense.weights", ""),
]


@pytest.mark.parametrize("name, overrides, key, words", SPECIFIC, ids=[f"{c[0]}:{c[1][0]}" for c in SPECIFIC])
def test_plugin_specific_bad_values(name, overrides, key, words):
    kind = key.split(".")[0]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{kind}={name}", *overrides])
    msg = str(err.value)
    assert "\n" not in msg and key in msg and words in msg, msg


def test_every_plugin_is_covered():
    """A new plugin with parameters gets the three generic cases without a line of test code."""
    covered = {(k, n) for k, n, *_ in GENERIC}
    assert covered == {(k, n) for k, n, _ in _plugins()}
    values = [c[3] for c in GENERIC]
    assert "1" in values and "abc" in values and any(v.startswith("-") for v in values)  # all three kinds occur
