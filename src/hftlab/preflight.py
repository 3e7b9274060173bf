"""Checks made before anything expensive (building the organism, loading a model, training).

A run fails in a second, with one line naming the key or file, when its ``out_dir`` or store cannot be
written, its store is not an SQLite database, its model path exists nowhere, or a data file it reads is
malformed; not after an alignment it then cannot save. Nothing here creates a file or a folder.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError

SQLITE_MAGIC = b"SQLite format 3\x00"


def writable_folder(path: str | Path, key: str) -> None:
    """``path`` is a folder we can write in, or can be created (its nearest existing parent is a
    writable folder); raise a UserError naming ``key`` otherwise."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}: '{path}' is a file, not a folder")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key}: cannot create the folder '{path}': '{probe}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{key}: cannot write in '{probe}' ({e.strerror or e})") from None


def store_file(path: str | Path, key: str, must_exist: bool = False) -> None:
    """``path`` is an SQLite file (an empty file counts), or does not exist yet and can be created."""
    p = Path(path).expanduser()
    if not p.exists():
        if must_exist:
            raise UserError(f"{key}: no such file '{path}'")
        writable_folder(p.parent, key)
        return
    if p.is_dir():
        raise UserError(f"{key}: '{path}' is a folder, not an SQLite file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise UserError(f"{key}: cannot read '{path}' ({e.strerror or e})") from None
    if head and head != SQLITE_MAGIC:
        raise UserError(f"{key}: '{path}' is not an SQLite database")


def looks_local(name: str) -> bool:
    """A model value meant as a folder, not a hub id (``name`` or ``org/name``): it starts with / . or ~,
    has two slashes or more, or holds the platform's own separator (``\\`` on Windows)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def model_path(name: str, key: str = "model") -> None:
    """A model value meant as a local path must exist (a hub id is checked when it is loaded)."""
    if name != "organism" and looks_local(name) and not Path(name).expanduser().exists():
        raise UserError(f"{key}: no such folder '{name}'")


def check_paths(cfg: Any) -> None:
    """The run's folders, store and model path (no model, no data read)."""
    writable_folder(cfg.out_dir, "out_dir")
    store_file(cfg.store or Path(cfg.out_dir) / "results.sqlite", "store")
    model_path(cfg.model.name)


def check_data(cfg: Any, source: Any, task: Any, defense: Any) -> None:
    """Read every dataset the run uses (real data only: the organism's world is generated), so that a
    malformed or missing file fails before the alignment; the rows are cached for the stages."""
    if cfg.data.source != "hub":
        return
    source.alignment(1)
    source.harmful("attack", 1)
    source.harmful("eval", 1)
    if "harmful" in getattr(defense, "needs", ()):
        source.harmful("provider", 1)
    task.examples(source, "train", 1)
    task.examples(source, "test", 1)
