"""The SQLite results store: one row per finished run (config, metrics, timings)."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

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


def connect(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(SCHEMA)
    return con


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
    con = connect(path)
    try:
        with con:
            con.execute(f"INSERT OR REPLACE INTO runs VALUES ({','.join('?' * len(row))})", row)
    finally:
        con.close()


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
