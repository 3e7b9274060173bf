"""The shipped organism: it is the build of the current spec and world, and a cache without it gets it
by a copy (no build)."""
from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.organism import build


def test_the_shipped_organism_is_the_build_of_this_world():
    """A world or spec edit changes the cache key: the shipped organism must then be rebuilt and pinned
    (`hftlab organism build --out DIR && hftlab organism pin --out DIR`), or every user builds their own."""
    assert build.pinned_build() == build.organism_dir().name
    assert all((build.PINNED / f).is_file() for f in build.PINNED_FILES)


def test_an_empty_cache_installs_the_shipped_organism_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("HFTLAB_HOME", str(tmp_path))

    def no_build(*_a, **_k):
        raise AssertionError("the organism was built instead of installed")

    monkeypatch.setattr(build, "_build", no_build)
    folder = build.ensure_organism()
    assert folder.parent == tmp_path / "organism" and folder.name == build.pinned_build()
    for f in build.PINNED_FILES:
        assert (folder / f).read_bytes() == (build.PINNED / f).read_bytes(), f
    from hftlab.config import ModelConfig
    from hftlab.models.loading import load_model, load_tokenizer

    model = load_model(folder, ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == 963_200 and len(load_tokenizer(folder, ModelConfig())) == 860


def test_rebuild_refuses_a_folder_that_holds_an_organism(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError):
        build.rebuild(Path(tmp_path))
