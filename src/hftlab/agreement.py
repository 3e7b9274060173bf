"""Agreement between the organism's ranking of defenses and the papers' rankings.

Pure functions: Kendall's τ-b between two orderings (ties allowed), a bootstrap interval for τ over the
organism's seeds, the sign agreement of each method's change versus SFT (ΔHS, ΔFA), the loader of the
published results file (``docs/published/results.csv``) and the grouping of its rows into the tables the
organism can mirror. Reading the results store and writing the report is ``bench/agreement.py``.
"""
from __future__ import annotations

import csv
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

# The organism's twin of each published fine-tuning task.
TASK_TWINS = {"sst2": "sentiment", "agnews": "topic", "ag_news": "topic", "gsm8k": "arithmetic",
              "alpaca": "instruction", "alpacaeval": "instruction"}
COLUMNS = ("paper_title", "arxiv_id", "arxiv_version", "table", "model", "task", "p", "n", "condition", "method",
           "paper_method", "hs", "fa", "source", "note")
REQUIRED = ("paper_title", "arxiv_id", "table", "method")


@dataclass(frozen=True)
class Published:
    """One cell of a published table: a method's HS and FA (percent) at one setting."""

    paper_title: str
    arxiv_id: str
    arxiv_version: str
    table: str
    model: str
    task: str
    p: float | None
    n: int | None
    condition: str
    method: str
    paper_method: str
    hs: float | None
    fa: float | None
    source: str
    note: str


def _number(text: str, where: str, kind: type = float) -> float | int | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {text!r} is not a finite number")
    return value


def load_published(path: str | Path) -> list[Published]:
    """Rows of the published results CSV; a blank ``hs``/``fa``/``p``/``n`` is None (not reported)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no published results file")
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            for key in REQUIRED:
                if not row[key].strip():
                    raise ValueError(f"{where}: {key} is empty")
            out.append(Published(
                **{k: row[k].strip() for k in ("paper_title", "arxiv_id", "arxiv_version", "table", "model", "task",
                                                "condition", "method", "paper_method", "source", "note")},
                p=_number(row["p"], f"{where}: p"), n=_number(row["n"], f"{where}: n", int),
                hs=_number(row["hs"], f"{where}: hs"), fa=_number(row["fa"], f"{where}: fa")))
    return out


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's τ-b of two paired sequences (ties counted in both); None when either is constant or n < 2."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: lengths differ ({len(x)} vs {len(y)})")
    concordant = discordant = tie_x = tie_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            tie_x += dx == 0
            tie_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - tie_x) * (pairs - tie_y))
    return (concordant - discordant) / denom if denom else None


def _sign(v: float, tol: float = 0.0) -> int:
    return 0 if abs(v) <= tol else (1 if v > 0 else -1)


def sign_agreement(published: Mapping[str, float], organism: Mapping[str, float],
                   tol: float = 0.0) -> tuple[int, int]:
    """(methods whose change has the same sign in both, methods compared) over the common keys; a change
    of at most ``tol`` in absolute value counts as 0 (no change)."""
    common = [k for k in published if k in organism]
    agree = sum(_sign(published[k], tol) == _sign(organism[k], tol) for k in common)
    return agree, len(common)


def cell_mean(columns: Sequence[Sequence[float]]) -> float:
    """A method's value over a table's columns: the mean over columns of the mean over seeds."""
    return statistics.mean(statistics.mean(c) for c in columns)


def bootstrap_tau(published: Mapping[str, float], organism: Mapping[str, Sequence[Sequence[float]]],
                  n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """τ-b between the published values and the organism's (``cell_mean`` of per-column seed lists), with a
    percentile bootstrap interval: each resample redraws, with replacement, the seeds of every (method, column)
    cell. Returns (point, low, high); the interval is None when no resample has a defined τ."""
    methods = [m for m in published if m in organism]
    point = kendall_tau_b([published[m] for m in methods], [cell_mean(organism[m]) for m in methods])
    rng = random.Random(seed)
    taus = []
    for _ in range(n_boot):
        means = [statistics.mean(statistics.mean(rng.choices(col, k=len(col))) for col in organism[m]) for m in methods]
        tau = kendall_tau_b([published[m] for m in methods], means)
        if tau is not None:
            taus.append(tau)
    if not taus:
        return point, None, None
    taus.sort()
    lo_i = int(math.floor((1 - level) / 2 * (len(taus) - 1)))
    hi_i = int(math.ceil((1 + level) / 2 * (len(taus) - 1)))
    return point, taus[lo_i], taus[hi_i]


def is_default_condition(condition: str) -> bool:
    """A published column the organism's default protocol mirrors: no condition, or one marked (default)."""
    return not condition or "(default)" in condition


@dataclass
class Table:
    """One published table (or one model's block of it) that the organism can mirror: methods × harmful ratios."""

    arxiv_id: str
    paper_title: str
    table: str
    model: str
    task: str  # the paper's task
    twin: str  # the organism's task
    n: int | None
    ratios: list[float] = field(default_factory=list)
    # method → p → (HS, FA)
    cells: dict[str, dict[float, tuple[float | None, float | None]]] = field(default_factory=dict)
    not_in_hftlab: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        text = f"{self.arxiv_id}-{self.table}-{self.model}"
        return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")

    @property
    def title(self) -> str:
        return f"{self.paper_title.split(':')[0]} ({self.arxiv_id}) {self.table}, {self.model}, {self.task}"


def _not_mirrored(r: Published, twin: str | None) -> str | None:
    """Why the organism cannot mirror this published cell, or None."""
    if not r.task:
        return "no task"
    if twin is None:
        return f"task {r.task} has no organism twin"
    if r.p is None:
        return "no harmful ratio"
    if not is_default_condition(r.condition):
        return f"condition {r.condition}"
    return None


def mirror_tables(rows: Sequence[Published], known: Sequence[str]) -> tuple[list[Table], list[str]]:
    """Group the published rows into tables the organism can mirror (a task with an organism twin, a harmful
    ratio, the default condition). Returns the tables and one line per group of rows that cannot be mirrored."""
    tables: dict[tuple, Table] = {}
    skipped: dict[str, int] = {}
    for r in rows:
        twin = TASK_TWINS.get(r.task.lower().replace("-", "").replace(" ", ""))
        why = _not_mirrored(r, twin)
        if why:
            key = f"{r.arxiv_id} {r.table}: {why}"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        key = (r.arxiv_id, r.table, r.model, r.task, r.n)
        t = tables.setdefault(key, Table(r.arxiv_id, r.paper_title, r.table, r.model, r.task, twin, r.n))
        if r.p not in t.ratios:
            t.ratios.append(r.p)
        if r.method not in known:
            if r.method not in t.not_in_hftlab:
                t.not_in_hftlab.append(r.method)
            continue
        t.cells.setdefault(r.method, {})[r.p] = (r.hs, r.fa)
    for t in tables.values():
        t.ratios.sort()
    return list(tables.values()), [f"{k} ({n} rows)" for k, n in skipped.items()]


def choose_columns(methods_at: Mapping[float, set[str]]) -> tuple[list[float], set[str]]:
    """The ratios and methods of a table-level comparison, every method having every chosen ratio: the set
    of ratios whose common methods are most numerous (at least two), then the one with most ratios."""
    ratios = sorted(methods_at)
    best: tuple[int, int] = (1, 0)
    chosen: tuple[list[float], set[str]] = ([], set())
    for mask in range(1, 2 ** len(ratios)):
        cols = [p for i, p in enumerate(ratios) if mask >> i & 1]
        common = set.intersection(*(set(methods_at[p]) for p in cols))
        if len(common) >= 2 and (len(common), len(cols)) > best:
            best, chosen = (len(common), len(cols)), (cols, common)
    return chosen


def _delta(values: Mapping[str, float], base: str = "sft") -> dict[str, float]:
    return {m: v - values[base] for m, v in values.items() if m != base} if base in values else {}


def compare_table(table: Table, organism: Mapping[tuple[str, float], Sequence[tuple[float, float]]],
                  n_boot: int = 2000, seed: int = 0, level: float = 0.95, tol: float = 0.0) -> dict:
    """Compare one published table with the organism's cells ``(method, p) → [(HS, FA) per seed]``.

    Table level: the methods and ratios both sides have (``choose_columns``), each method's value the mean
    over those ratios; τ-b of HS and of FA with bootstrap intervals over the seeds, sign agreement of ΔHS and
    ΔFA versus SFT (a change within ``tol`` points is no change). Per ratio: the same on that column alone.
    Cells the table has and the organism lacks are listed in ``missing``."""
    methods_at: dict[float, set[str]] = {}
    missing = []
    for m, by_p in table.cells.items():
        for p, (hs, fa) in by_p.items():
            if hs is None and fa is None:
                continue
            if organism.get((m, p)):
                methods_at.setdefault(p, set()).add(m)
            else:
                missing.append({"method": m, "p": p})
    cols, methods = choose_columns(methods_at)
    result = {"table": table.title, "slug": table.slug, "arxiv_id": table.arxiv_id, "paper_table": table.table,
              "model": table.model, "task": table.task, "organism_task": table.twin, "n": table.n,
              "published_ratios": table.ratios, "not_in_hftlab": table.not_in_hftlab, "missing": missing,
              "ratios": cols, "methods": sorted(methods), "columns": []}
    if cols:
        result.update(_compare(table, organism, sorted(methods), cols, n_boot, seed, level, tol))
    for p in sorted(methods_at):
        ms = sorted(methods_at[p])
        if len(ms) >= 2:
            column = _compare(table, organism, ms, [p], n_boot, seed, level, tol)
            result["columns"].append({"p": p, "methods": ms, **column})
    return result


def _compare(table: Table, organism: Mapping[tuple[str, float], Sequence[tuple[float, float]]],
             methods: Sequence[str], cols: Sequence[float], n_boot: int, seed: int, level: float, tol: float) -> dict:
    out: dict = {"seeds": {m: min(len(organism[(m, p)]) for p in cols) for m in methods}}
    for i, metric in enumerate(("hs", "fa")):
        pub = {m: statistics.mean(table.cells[m][p][i] for p in cols) for m in methods
               if all(table.cells[m][p][i] is not None for p in cols)}
        org_cells = {m: [[s[i] for s in organism[(m, p)]] for p in cols] for m in pub}
        org = {m: cell_mean(c) for m, c in org_cells.items()}
        tau, lo, hi = bootstrap_tau(pub, org_cells, n_boot, seed, level)
        agree, total = sign_agreement(_delta(pub), _delta(org), tol)
        out[metric] = {"published": pub, "organism": org, "published_delta": _delta(pub), "organism_delta": _delta(org),
                       "tau": tau, "tau_low": lo, "tau_high": hi, "sign_agree": agree, "sign_total": total}
    return out
