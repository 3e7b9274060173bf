"""Tables from results: Markdown, CSV and LaTeX, grouped with mean ± std over seeds."""
from __future__ import annotations

import csv
import io
import statistics
from typing import Any, Sequence

COLUMNS = ("defense", "attack", "task", "ratio", "n", "harmful_score", "finetune_accuracy")


def fmt_num(values: Sequence[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def value(row: dict[str, Any], key: str) -> Any:
    """A column of a store row, or a dotted config key (``finetune.lr``) from its config; a plugin's
    parameter is found by its CLI name (``defense.rho`` for ``defense.params.rho``)."""
    if key in row:
        return row[key]
    found = _lookup(row.get("config", {}), key.split("."))
    section, _, rest = key.partition(".")
    if found is None and rest and not rest.startswith("params."):
        found = _lookup(row.get("config", {}), [section, "params", *rest.split(".")])
    return found


def _lookup(node: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


BASE_GROUPS = ("model", "defense", "attack", "task", "ratio", "n")
_SAME_AS = {"model.name": "model", "defense.name": "defense", "attack.name": "attack", "attack.ratio": "ratio",
            "attack.n": "n"}
_REPLICATES = {"seed", "out_dir", "store", "threads"}  # what a mean over seeds averages over


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        # a plugin's parameter by its CLI name (defense.rho for defense.params.rho)
        key = prefix if k == "params" else f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, key))
    return out


def varying_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Config keys (dotted CLI names) whose value differs between rows, seeds excluded: rows that
    differ in any of them are different experiments, never one mean."""
    flat = [_flatten(r.get("config", {})) for r in rows]
    keys = dict.fromkeys(k for f in flat for k in f)

    def varies(key: str) -> bool:
        if key.startswith("defense."):  # each defense has its own parameters: compare like with like
            by_defense: dict[Any, set[str]] = {}
            for f in flat:
                by_defense.setdefault(f.get("defense.name"), set()).add(repr(f.get(key)))
            return any(len(v) > 1 for v in by_defense.values())
        return len({repr(f.get(key)) for f in flat}) > 1

    return [k for k in keys if k not in _REPLICATES and k not in _SAME_AS and varies(k)]


def auto_groups(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's default grouping: the base columns, then every config key that varies."""
    return [*BASE_GROUPS, *varying_keys(rows)]


def report_groups(rows: Sequence[dict[str, Any]], by: Sequence[str] = (),
                  average_over: Sequence[str] = ()) -> list[str]:
    """``hftlab report --by/--average-over``: the keys in ``by`` first, then every key of the default
    grouping (:func:`auto_groups`), less those in ``average_over``. Runs of different ratios, attacks,
    tasks or models are one mean only when the user names those keys in ``average_over``."""
    drop = {_SAME_AS.get(k, k) for k in average_over}
    keys = [_SAME_AS.get(k, k) for k in by]
    return [k for k in dict.fromkeys([*keys, *auto_groups(rows)]) if k not in drop]


def _key(v: Any) -> Any:
    return str(v) if isinstance(v, (list, dict)) else v


def _order(key: tuple) -> tuple:
    """A sort key for mixed group keys: numbers by value, then strings, then None."""
    return tuple((0, float(v), "") if isinstance(v, (int, float)) else (2, 0.0, "") if v is None else (1, 0.0, str(v))
                 for v in key)


def _plugin_param(rows: Sequence[dict[str, Any]], key: str) -> bool:
    """True if ``key`` (``defense.rho``) is a plugin's own parameter (``defense.params.rho``) in some row."""
    section, _, rest = key.partition(".")
    return bool(rest) and any(isinstance(r.get("config", {}).get(section), dict)
                              and rest in (r["config"][section].get("params") or {}) for r in rows)


def summarise(rows: list[dict[str, Any]], by: Sequence[str] = BASE_GROUPS,
              metrics: Sequence[str] = ("harmful_score", "finetune_accuracy")) -> tuple[list[str], list[list[str]]]:
    """Group rows by ``by`` and give mean ± std of each metric with the number of seeds, rows sorted by
    the grouping keys. Plugins' own parameters (``defense.rho``) are one ``params`` column that shows
    each row's values (``rho=2``; blank for a defense without them): the same name means different
    things for different defenses, so they never share a column."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(_key(value(r, k)) for k in by), []).append(r)
    params = [i for i, k in enumerate(by) if _plugin_param(rows, k)]
    shown = [i for i in range(len(by)) if i not in params]

    def param_text(key: tuple) -> str:
        cells = []
        for i in params:
            section, _, name = by[i].partition(".")
            if key[i] is not None:
                cells.append(f"{name if section == 'defense' else by[i]}={key[i]}")
        return ", ".join(cells)

    header = [*(by[i] for i in shown), *(["params"] if params else []), *metrics, "seeds"]
    body = [[*("" if key[i] is None else str(key[i]) for i in shown), *([param_text(key)] if params else []),
             *(fmt_num([value(r, m) for r in rs]) for m in metrics), str(len(rs))]
            for key, rs in sorted(groups.items(), key=lambda kv: _order(kv[0]))]
    return header, body


def render(header: list[str], body: list[list[str]], fmt: str = "markdown") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(body)
        return buf.getvalue()
    if fmt == "latex":
        esc = lambda s: s.replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%")  # noqa: E731
        lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
                 " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in row) + r" \\" for row in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    return "\n".join(out) + "\n"
