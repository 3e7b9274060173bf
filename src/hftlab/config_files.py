"""Finding a config file: a path, or the name of a config shipped with hftlab.

``-c configs/defenses/lisa.yaml`` is a path and works from the folder it is relative to; ``-c
defenses/lisa`` or ``-c lisa`` names a shipped config and works from anywhere. The shipped configs are
the repository's ``configs/`` folder, installed with the package as ``hftlab/configs``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "configs"
SKIPPED = ("accelerate",)  # Accelerate's launch configs, not hftlab configs: reachable by folder only


def shipped_configs(root: Path = SHIPPED) -> list[Path]:
    """Every shipped hftlab config (``*.yaml`` under ``root``), sorted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] not in SKIPPED)


def find_config(name: str | Path, root: Path = SHIPPED) -> Path:
    """``name`` itself when it is a file; else the shipped config it names, relative to ``root`` with or
    without ``.yaml`` (``defenses/lisa``), or by its file name alone (``lisa``) when that is unique."""
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name)[:-5] if str(name).endswith(".yaml") else str(name)
    direct = root / f"{stem}.yaml"
    if not path.is_absolute() and direct.is_file():
        log.debug("config '%s': %s", name, direct)
        return direct
    parts = Path(stem).parts
    matches = [] if path.is_absolute() else [p for p in shipped_configs(root) if p.relative_to(root).with_suffix("").parts[-len(parts):] == parts]
    if len(matches) == 1:
        log.debug("config '%s': %s", name, matches[0])
        return matches[0]
    if matches:
        shown = ", ".join(p.relative_to(root).with_suffix("").as_posix() for p in matches)
        raise ConfigError(f"config '{name}' is ambiguous: it names {shown} (shipped in {root}); "
                          f"give the folder, e.g. -c {matches[0].relative_to(root).with_suffix('').as_posix()}")
    folders = sorted({p.parent.relative_to(root).as_posix() for p in shipped_configs(root)})
    raise ConfigError(f"config file '{name}' not found: not a file (from {Path.cwd()}), nor a shipped config "
                      f"in {root} ({', '.join(f + '/' for f in folders) or 'none shipped'})")
