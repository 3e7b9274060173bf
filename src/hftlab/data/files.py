"""Read the rows of one dataset split through the ``datasets`` library: a hub id, a local folder, or a
.json/.jsonl/.csv file. Every failure is one :class:`DataError` line naming the dataset and the field.

A local folder goes through the very code path of the hub (``load_dataset(folder, split=...)`` reads its
README's ``configs:`` metadata exactly as the hub repository's); a folder written by ``save_to_disk``
is read with ``load_from_disk``; ``{split}`` in a file path is replaced by the split name.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError

log = logging.getLogger(__name__)

FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv"}


def _where(spec: Any, split: str) -> str:
    return spec.path.replace("{split}", split)


def _load(spec: Any, split: str, key: str) -> Any:
    """The ``datasets.Dataset`` of ``split`` (raises DataError with one line)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - the [datasets] extra is missing
        raise DataError(f"{key}: real datasets need the 'datasets' package (pip install 'hftlab[datasets]')") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    where = _where(spec, split)
    local = Path(where)
    kind = FILE_KINDS.get(local.suffix.lower())
    if kind and local.is_file():
        check_file(local, key)  # file:line for a malformed row (datasets names neither)
    try:
        if kind and local.is_file():
            return datasets.load_dataset(kind, data_files=str(local), split="train")
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(local))[split]
        if local.is_dir() and (local / "state.json").is_file():
            return datasets.load_from_disk(str(local))
        if kind or where.startswith((".", "/")) and not local.exists():
            raise DataError(f"{key}.path: file '{where}' not found")
        return datasets.load_dataset(where, spec.name or None, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; keep the first line of each
        raise DataError(_explain(where, split, key, e)) from None


def check_file(path: Path, key: str) -> None:
    """Parse a local .json/.jsonl/.csv file; a DataError names ``key``, the file and the line that is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}.path: cannot read '{path}' ({e})") from None
    if not text.strip():
        raise DataError(f"{key}.path: '{path}' is empty")
    if path.suffix.lower() == ".csv":
        _check_csv(path, text, key)
        return
    try:  # one JSON document: a list of records, or one object (of columns, or a one-line JSON lines file)
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{key}.path: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None) if isinstance(doc, list) else None
        if not isinstance(doc, (list, dict)) or bad is not None:
            raise DataError(f"{key}.path: {path}: expected JSON records (objects), got {json.dumps(doc)[:40]}")
        return
    for n, line in enumerate(text.splitlines(), 1):  # JSON lines: one object a line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{key}.path: {path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{key}.path: {path}:{n}: expected a JSON object, got {line.strip()[:40]}")


def _check_csv(path: Path, text: str, key: str) -> None:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = 0
    try:
        header = next(reader)
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(f"{key}.path: {path}:{reader.line_num}: {len(row)} fields, the header has "
                                f"{len(header)}")
            rows += bool(row)
    except csv.Error as e:
        raise DataError(f"{key}.path: {path}:{reader.line_num}: invalid CSV ({e})") from None
    if not rows:
        raise DataError(f"{key}.path: {path}: a header and no rows")


def _explain(where: str, split: str, key: str, err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    low = f"{type(err).__name__} {err}".lower()
    if "gated" in low or "401" in low or "403" in low:
        return f"{key}.path: dataset '{where}' is gated or private; log in (HF_TOKEN) and accept its terms"
    if "unknown split" in low or ("split" in low and "should be one of" in low):
        return f"{key}: dataset '{where}' has no split '{split}' ({text})"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if not Path(where).exists() and (offline or "offline" in low or "connect" in low or "doesn't exist" in low
                                     or "not found" in low or "couldn't" in low):
        state = " (offline: HF_HUB_OFFLINE=1)" if offline else ""
        return f"{key}.path: dataset '{where}' is not a local file/folder and not on the hub or in its cache{state}"
    return f"{key}: cannot load dataset '{where}' split '{split}': {text}"


@lru_cache(maxsize=32)
def _rows_cached(path: str, name: str, split: str, fields: tuple[str, ...], key: str) -> tuple[dict, ...]:
    from types import SimpleNamespace

    spec = SimpleNamespace(path=path, name=name)
    ds = _load(spec, split, key)
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        attr = {v: k for k, v in _FIELD_ATTRS.get(key, {}).items()}
        f = missing[0]
        named = f" ({key}.{attr[f]})" if f in attr else ""
        raise DataError(f"{_where(spec, split)}: missing field '{f}'{named} in split '{split}' "
                        f"(columns: {', '.join(ds.column_names)})")
    log.info("%s: %d rows from %s [%s]", key, len(ds), _where(spec, split), split)
    return tuple(ds.select_columns(list(fields)).to_list()) if fields else tuple(ds.to_list())


_FIELD_ATTRS: dict[str, dict[str, str]] = {}  # key -> {attribute: field name}, for error messages


def rows(spec: Any, split: str, key: str, needs: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``split`` as dicts holding the fields named by ``spec.<attr>`` for each attr in ``needs``.

    ``key`` is the config key of the spec (``data.sst2``) for messages; a missing field is a DataError
    naming the field, the config key that declares it, and the file.
    """
    if not spec.path:
        raise DataError(f"{key}.path: not set")
    names = {a: getattr(spec, a) for a in needs}
    empty = [a for a, f in names.items() if not f]
    if empty:
        raise DataError(f"{key}.{empty[0]}: the field name is empty but is needed")
    _FIELD_ATTRS[key] = names
    fields = tuple(dict.fromkeys(names.values()))
    return [dict(r) for r in _rows_cached(spec.path, spec.name, split, fields, key)]
