"""Run folders: content hashes, atomic writes, manifests.

A stage's folder is ``<out_dir>/<stage>/<hash>/``; it is complete when its ``manifest.json`` exists
(written last, atomically), so an interrupted stage is simply redone and a finished one reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def content_hash(*parts: Any, length: int = 12) -> str:
    """Stable hash of JSON-serialisable parts (sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a file written by open() would follow the umask
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    """The process's umask, read once (setting it to read it back is not thread-safe, so only once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give the files under ``folder`` the read and write bits that ``open()`` would (the umask's): a
    library that writes through a temporary file, as safetensors does, leaves them 0600."""
    allowed = 0o666 & ~_umask()
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            mode = p.stat().st_mode & 0o777
            if mode | allowed != mode:
                os.chmod(p, mode | allowed)


def link_stages(run_dir: Path, stages: Iterable[tuple[str, str]]) -> None:
    """In a run folder, one relative link per stage to the folder it was computed in (replaced when a
    rerun names another); a stage name met twice gets a numbered link."""
    seen: dict[str, int] = {}
    for name, target in stages:
        seen[name] = seen.get(name, 0) + 1
        link = run_dir / (name if seen[name] == 1 else f"{name}_{seen[name]}")
        tmp = run_dir / f".{link.name}.{os.getpid()}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def library_versions() -> dict[str, str]:
    """Versions that determine a run's numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("hftlab", "torch", "transformers", "peft", "accelerate", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def stage_dir(out_dir: str | Path, stage: str, digest: str) -> Path:
    return Path(out_dir) / stage / digest


def is_complete(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def discard_partial(folder: Path) -> bool:
    """Remove a stage folder that a killed run left without its manifest, so that none of its files (a
    half-written model, a temporary file of an atomic write) is reused by the stage's next computation."""
    if folder.is_dir() and not is_complete(folder):
        shutil.rmtree(folder)
        return True
    return False


@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a stage folder across processes (released when the holder dies)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_manifest(folder: Path, **fields: Any) -> dict[str, Any]:
    manifest = {"versions": library_versions(), **fields}
    write_json(folder / "manifest.json", manifest)
    return manifest
