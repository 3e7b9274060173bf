"""The SQLite results store: one row per finished run (config, metrics, timings).

Safe with many concurrent writers (local cells, Ray workers, Slurm jobs): a busy timeout and retries
while the database is locked; WAL mode on one host, ``HFTLAB_STORE_JOURNAL=delete`` for a store on a
network disk written from several nodes.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from .config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    defense TEXT, attack TEXT, task TEXT, model TEXT,
    ratio REAL, n INTEGER, seed INTEGER,
    harmful_score REAL, finetune_accuracy REAL,
    aligned_harmful_score REAL, aligned_finetune_accuracy REAL,
    seconds REAL,
    config TEXT NOT NULL, metrics TEXT NOT NULL, stages TEXT NOT NULL
)
"""


# Many writers share one store (parallel cells, Ray workers, Slurm jobs): each waits up to BUSY_S for
# SQLite's lock, and an operation that still finds the database locked is retried with backoff.
BUSY_S = 60.0
RETRY_S = 300.0
# SQLite's WAL needs the writers on one host; a store on a network disk written from several nodes
# (Ray, Slurm) takes HFTLAB_STORE_JOURNAL=delete (the rollback journal and the disk's file locks).
# Unset, a new store is created in WAL mode and an existing one keeps the mode it has.
JOURNALS = ("wal", "delete", "truncate", "persist")


def _retry(op: Callable[[], T]) -> T:
    """``op()``, retried while SQLite says the database is locked or busy (for up to RETRY_S)."""
    deadline, delay = time.monotonic() + RETRY_S, 0.05
    while True:
        try:
            return op()
        except sqlite3.OperationalError as e:
            if not any(w in str(e) for w in ("locked", "busy")) or time.monotonic() > deadline:
                raise
            log.debug("store busy (%s); retrying in %.2fs", e, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


def connect(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = os.environ.get("HFTLAB_STORE_JOURNAL", "").lower()
    if journal and journal not in JOURNALS:
        raise ConfigError(f"HFTLAB_STORE_JOURNAL: {journal!r} is not one of {', '.join(JOURNALS)}")

    def open_() -> sqlite3.Connection:
        con = sqlite3.connect(path, timeout=BUSY_S)
        try:
            con.execute(f"PRAGMA busy_timeout={int(BUSY_S * 1000)}")
            # Unset: WAL for a new store (readers never block the writer), an existing one keeps its mode.
            wanted = journal or ("wal" if not con.execute("SELECT 1 FROM sqlite_master WHERE name='runs'").fetchone()
                                 else "")
            if wanted and con.execute("PRAGMA journal_mode").fetchone()[0].lower() != wanted:
                con.execute(f"PRAGMA journal_mode={wanted}")
            con.execute(SCHEMA)
        except BaseException:
            con.close()
            raise
        return con

    return _retry(open_)


def record(path: str | Path, run_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
    """Insert or replace the run's row in one transaction."""
    aligned = result.get("aligned") or {}
    row = (
        run_id, time.time(), config["defense"]["name"], config["attack"]["name"], config["task"],
        result["base_model"], config["attack"]["ratio"], config["attack"]["n"], config["seed"],
        result["harmful_score"], result["finetune_accuracy"],
        aligned.get("harmful_score"), aligned.get("finetune_accuracy"),
        sum(s["seconds"] for s in result["stages"]),
        json.dumps(config, sort_keys=True), json.dumps(result.get("metrics", {}), sort_keys=True),
        json.dumps(result["stages"]),
    )
    def write() -> None:
        con = connect(path)
        try:
            with con:
                con.execute(f"INSERT OR REPLACE INTO runs VALUES ({','.join('?' * len(row))})", row)
        finally:
            con.close()

    _retry(write)


def rows(path: str | Path, where: str = "", params: tuple = ()) -> list[dict[str, Any]]:
    """All rows (as dicts, JSON columns decoded), oldest first."""
    if not Path(path).is_file():
        return []
    con = connect(path)
    con.row_factory = sqlite3.Row
    try:
        cur = con.execute(f"SELECT * FROM runs {where} ORDER BY created", params)
        out = []
        for r in cur.fetchall():
            d = dict(r)
            for k in ("config", "metrics", "stages"):
                d[k] = json.loads(d[k])
            out.append(d)
        return out
    finally:
        con.close()
