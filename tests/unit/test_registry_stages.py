"""A defense's stage is written once, in its registry entry, and everything that groups defenses by stage
reads it: ``Defense.stages`` / ``acts_in`` (the pipeline), the sweep's leader order, ``hftlab list`` and
the bench's step-time grouping."""
from __future__ import annotations

import ast
import inspect

import pytest

from hftlab import bench_suite, registry
from hftlab.cell import Cell
from hftlab.config import load_config
from hftlab.defenses.base import Defense
from hftlab.executors.base import priority

DEFENSES = registry.names("defense")


@pytest.mark.parametrize("name", DEFENSES)
def test_the_class_acts_where_its_entry_says(name):
    cls = registry.get("defense", name)
    stage = registry.entry("defense", name).stage
    assert cls.stages == registry.stages(name) == (() if stage == "none" else (stage,))
    for s in ("align", "finetune", "repair"):
        assert cls().acts_in(s) == (s == stage)


@pytest.mark.parametrize("name", DEFENSES)
def test_no_defense_class_writes_its_stage_again(name):
    """The class body sets no ``stages``: a second declaration could disagree with the entry."""
    cls = registry.get("defense", name)
    tree = ast.parse(inspect.getsource(cls))
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    assert "stages" not in assigned, (f"{inspect.getsourcefile(cls)}: remove `stages = ...`; the registry "
                                      f"entry of '{name}' declares its stage")


def test_unregistered_classes_inherit_or_set_their_stages():
    lisa = registry.get("defense", "lisa")

    class Mine(lisa):  # a test's or a user's subclass that is not registered
        pass

    class Own(Defense):
        stages = ("repair",)

    assert Mine.stages == ("finetune",) and Own.stages == ("repair",) and Defense.stages == ()


def test_sweep_leaders_listing_and_bench_agree_with_the_entries(capsys):
    cells = [Cell([f"defense={d}"], load_config([], [f"defense={d}"])) for d in DEFENSES]
    leaders = sorted(cells, key=priority)
    align = [d for d in DEFENSES if registry.entry("defense", d).stage == "align"]
    assert align and [c.cfg.defense.name for c in leaders[:len(align)]] == align
    assert all(c.align_group() != cells[0].align_group() for c in cells if c.cfg.defense.name in align)

    from hftlab.cli import main

    assert main(["list"]) == 0
    listed = {line.split()[0]: line.split()[1].strip("[]") for line in
              capsys.readouterr().out.split("attacks:")[0].splitlines()[1:]}
    assert listed == {d: registry.entry("defense", d).stage for d in DEFENSES}
    for d in DEFENSES:
        assert bench_suite._acting_stage(d) == (registry.stages(d) or ("finetune",))[0]


def test_every_entry_names_a_known_stage_and_register_checks_it():
    assert {e.stage for e in registry.entries()} <= set(registry.STAGE_ORDER)
    with pytest.raises(registry.RegistryError, match="unknown stage 'aling'"):
        registry.register("defense", "mine", "defenses.lisa:Lisa", "aling", "a typo")
    assert "mine" not in registry.names("defense")
