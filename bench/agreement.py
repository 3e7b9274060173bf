"""Agreement of the organism's ranking of defenses with the papers': ``python -m bench.agreement``.

    python -m bench.agreement [--store runs/results.sqlite] [--published docs/published/results.csv]
                              [--out reports/agreement] [--preset default tuned] [--where finetune.lr=0.002]
                              [--split test]

Loads the published tables, mirrors each one the organism can (hftlab's methods, the harmful ratios, the
organism's twin task: sentiment for SST2, topic for AGNEWS, arithmetic for GSM8K, instruction for
AlpacaEval), reads the organism's runs scored on the test split from the results store, and writes
``agreement.md``, ``agreement.json`` and one scatter plot per table and preset (organism ΔHS vs published
ΔHS, one labelled point per method). Organism runs are grouped by
(defense, preset): a run whose config has ``defense.preset=tuned`` is the tuned preset of its defense; a
preset without an SFT run uses the default SFT. Runs off the store's common protocol (the bench's stress
cells, other organism builds) are left out and counted; ``--where`` selects runs by config value instead.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from hftlab import registry, store
from hftlab.agreement import Table, compare_table, load_published, mirror_tables
from hftlab.report import _flatten, value, varying_keys

log = logging.getLogger("bench.agreement")
REPLICATE_KEYS = {"task", "attack.ratio", "attack.n", "seed"}  # what a table varies, never a protocol change


def preset_of(row: dict[str, Any]) -> str:
    return str(value(row, "defense.preset") or "default")


def default_config() -> dict[str, Any]:
    """The current default config, flattened to dotted keys."""
    from hftlab.config import load_config, to_dict

    return _flatten(to_dict(load_config()))


def select_rows(rows: Sequence[dict[str, Any]], where: Sequence[str] = (), attack: str = "harmful-mix",
                defaults: dict[str, Any] | None = None, split: str | None = "test") -> tuple[list[dict], list[str]]:
    """Runs of the papers' attack (harmful data mixed into the user data) scored on ``split`` (the report's
    test prompts: ``hftlab tune`` trials are scored on the validation split, on validation seeds, with many
    defense settings per seed, and must never stand in for a defense's cells; None keeps every split),
    matching every ``key=value`` of ``where``, then those on the modal protocol: for each config key that
    varies between runs (other than defense parameters, task, ratio, n and seed) and the base model, the
    most common value. A key a run's config lacks (written before the key existed) counts as its value in
    ``defaults``. Returns the rows kept and one line per reason a row was left out."""
    defaults = defaults or {}
    kept = [r for r in rows if r["attack"] == attack]
    notes = [f"left out {len(rows) - len(kept)} run(s) of another attack than {attack}"] * (len(kept) < len(rows))
    if split is not None:
        n_before = len(kept)
        kept = [r for r in kept if str(value(r, "eval.split") or defaults.get("eval.split", "test")) == split]
        if len(kept) < n_before:
            notes.append(f"left out {n_before - len(kept)} run(s) scored on another eval.split than {split} "
                         "(hftlab tune trials)")
    for cond in where:
        key, sep, want = cond.partition("=")
        if not sep:
            raise ValueError(f"--where {cond!r}: expected key=value")
        n_before = len(kept)
        kept = [r for r in kept if str(value(r, key)) == want]
        notes.append(f"--where {cond}: left out {n_before - len(kept)} run(s)")
    keys = ["model", *(k for k in varying_keys(kept) if not k.startswith("defense.") and k not in REPLICATE_KEYS)]
    flat = {id(r): {**defaults, **_flatten(r.get("config", {})), "model": r["model"]} for r in kept}
    for key in keys:
        vals = Counter(repr(flat[id(r)].get(key)) for r in kept)
        if len(vals) < 2:
            continue
        mode, _ = vals.most_common(1)[0]
        n_before = len(kept)
        kept = [r for r in kept if repr(flat[id(r)].get(key)) == mode]
        notes.append(f"left out {n_before - len(kept)} run(s) whose {key} differs from the common {mode}")
    return kept, notes


def organism_cells(rows: Sequence[dict[str, Any]], table: Table, preset: str) -> tuple[dict, list[str]]:
    """``(method, p) → [(HS, FA) per seed]`` for one table and preset (the newest run per seed), from the
    runs with the table's n, else from the n with most seeds (noted); a preset lacking a method falls back
    to its default preset (noted)."""
    index: dict[tuple, dict[int, dict[int, tuple[float, float]]]] = {}
    for r in rows:  # oldest first: a newer run of the same seed replaces an older one
        key = (r["defense"], preset_of(r), r["task"], round(float(r["ratio"]), 6))
        index.setdefault(key, {}).setdefault(r["n"], {})[r["seed"]] = (r["harmful_score"], r["finetune_accuracy"])
    cells, notes = {}, []
    for m in table.cells:
        for p in table.cells[m]:
            for pr in dict.fromkeys((preset, "default")):
                by_n = index.get((m, pr, table.twin, round(p, 6)))
                if not by_n:
                    continue
                n = table.n if table.n in by_n else max(by_n, key=lambda k: (len(by_n[k]), k))
                if n != table.n:
                    notes.append(f"{m} at p = {p}: organism n = {n}, paper n = {table.n}")
                if pr != preset:
                    notes.append(f"{m} at p = {p}: no {preset} run, its default preset is used")
                cells[(m, p)] = list(by_n[n].values())
                break
    return cells, notes


def _tau(d: dict, seeds: int = 2) -> str:
    """τ with its bootstrap interval; with one seed per cell there is nothing to resample."""
    if d["tau"] is None:
        return "–"
    if seeds < 2:
        return f"{d['tau']:+.2f} (1 seed)"
    ci = f" [{d['tau_low']:+.2f}, {d['tau_high']:+.2f}]" if d["tau_low"] is not None else ""
    return f"{d['tau']:+.2f}{ci}"


def _sign(d: dict) -> str:
    return f"{d['sign_agree']}/{d['sign_total']}" if d["sign_total"] else "–"


def render(results: Sequence[dict], notes: Sequence[str], skipped: Sequence[str], n_rows: int, args: Any) -> str:
    lines = ["# Agreement of the organism with the published rankings\n",
             f"Store `{args.store}` ({n_rows} runs used), published file `{args.published}`; bootstrap "
             f"{args.boot} resamples (seed {args.seed}) over the organism's seeds, 95 % percentile interval. "
             "τ-b ranks the methods by HS (or FA) on each side; sign = methods whose change versus SFT has the same "
             f"sign in the paper and on the organism (changes within ±{args.tol:g} points count as none). Table "
             "level: mean over the ratios both sides have.\n"]
    if notes:
        lines += ["## Runs left out\n", *(f"- {n}" for n in notes), ""]
    lines += ["## Per table\n", "| table | preset | ratios | methods | τ HS | τ FA | sign ΔHS | sign ΔFA | seeds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r["ratios"]:
            lines.append(f"| {r['table']} | {r['preset']} | – | – | – | – | – | – | no organism cells |")
            continue
        seeds = sorted(set(r["seeds"].values()))
        lines.append(f"| {r['table']} | {r['preset']} | {', '.join(map(str, r['ratios']))} | "
                     f"{', '.join(r['methods'])} | "
                     f"{_tau(r['hs'], seeds[-1])} | {_tau(r['fa'], seeds[-1])} | {_sign(r['hs'])} | {_sign(r['fa'])} | "
                     f"{'–'.join(map(str, (seeds[0], seeds[-1]))) if len(seeds) > 1 else seeds[0]} |")
    lines += ["\n## Per harmful ratio\n", "| table | preset | p | methods | τ HS | sign ΔHS | sign ΔFA |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["columns"]:
            lines.append(f"| {r['table']} | {r['preset']} | {c['p']} | {len(c['methods'])} | "
                         f"{_tau(c['hs'], max(c['seeds'].values()))} | "
                         f"{_sign(c['hs'])} | {_sign(c['fa'])} |")
    lines += ["\n## ΔHS versus SFT (table level): paper / organism\n"]
    for r in results:
        if r["ratios"] and r["hs"]["published_delta"]:
            pub, org = r["hs"]["published_delta"], r["hs"]["organism_delta"]
            cells = ", ".join(f"{m} {pub[m]:+.1f} / {org.get(m, float('nan')):+.1f}" for m in pub)
            lines.append(f"- {r['table']} ({r['preset']}): {cells}")
    lines += ["\n## Missing organism cells (listed, not invented)\n"]
    for r in results:
        if r["missing"]:
            cells = ", ".join(f"{m['method']}@{m['p']}" for m in r["missing"])
            lines.append(f"- {r['table']} ({r['preset']}, task {r['organism_task']}): {cells}")
    lines += ["\n## Published methods hftlab lacks, and tables not mirrored\n"]
    for r in results:
        if r["not_in_hftlab"] and r["preset"] == results[0]["preset"]:
            lines.append(f"- {r['table']}: {', '.join(r['not_in_hftlab'])}")
    lines += [f"- {s}" for s in skipped]
    for r in results:
        lines += [f"- {r['table']} ({r['preset']}): {n}" for n in r.get("organism_notes", [])]
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict) -> None:
    """Organism ΔHS (x) vs published ΔHS (y) per method; points in the shaded quadrants agree in sign."""
    from hftlab.plots import _plt, _styles

    pub, org = result["hs"]["published_delta"], result["hs"]["organism_delta"]
    methods = [m for m in pub if m in org]
    if not methods:
        return
    plt = _plt()
    styles = _styles(methods)
    fig, ax = plt.subplots(figsize=(6, 5))
    for m in methods:
        ax.scatter(org[m], pub[m], s=50, color=styles[m]["color"], marker=styles[m]["marker"], zorder=3)
        ax.annotate(m, (org[m], pub[m]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    span_x = max(1.0, *(abs(org[m]) for m in methods)) * 1.2
    span_y = max(1.0, *(abs(pub[m]) for m in methods)) * 1.2
    ax.fill_between([-span_x, 0], -span_y, 0, color="green", alpha=0.06)
    ax.fill_between([0, span_x], 0, span_y, color="green", alpha=0.06)
    ax.axhline(0, color="grey", lw=1)
    ax.axvline(0, color="grey", lw=1)
    ax.set_xlim(-span_x, span_x)
    ax.set_ylim(-span_y, span_y)
    ax.set_xlabel(f"organism ΔHS vs SFT (points; task {result['organism_task']})")
    ax.set_ylabel(f"published ΔHS vs SFT (points; {result['task']})")
    tau = result["hs"]["tau"]
    ax.set_title(f"{result['table']}\npreset {result['preset']}, p = {', '.join(map(str, result['ratios']))}; "
                 f"τ-b {'–' if tau is None else f'{tau:+.2f}'}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: Any) -> dict:
    published = load_published(args.published)
    tables, skipped = mirror_tables(published, registry.names("defense"))
    all_rows = store.rows(args.store)
    rows, notes = select_rows(all_rows, args.where, args.attack, default_config(), args.split or None)
    presets = args.preset or sorted({preset_of(r) for r in rows} | {"default"}, key=lambda p: (p != "default", p))
    results = []
    for table in tables:
        for preset in presets:
            cells, cell_notes = organism_cells(rows, table, preset)
            res = compare_table(table, cells, args.boot, args.seed, tol=args.tol)
            res.update(preset=preset, organism_notes=cell_notes, seeds=res.get("seeds", {}))
            results.append(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.md").write_text(render(results, notes, skipped, len(rows), args), encoding="utf-8")
    summary = {"store": str(args.store), "published": str(args.published), "runs_in_store": len(all_rows),
               "runs_used": len(rows), "left_out": notes, "not_mirrored": skipped, "boot": args.boot,
               "seed": args.seed, "tables": results}
    (out / "agreement.json").write_text(json.dumps(summary, indent=1, sort_keys=True, default=str), encoding="utf-8")
    for res in results:
        if res["ratios"]:
            plot(out / f"{res['slug']}_{res['preset']}.png", res)
    return summary


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/results.sqlite", help="SQLite results store")
    ap.add_argument("--published", default="docs/published/results.csv", help="published results CSV")
    ap.add_argument("--out", default="reports/agreement", help="report folder")
    ap.add_argument("--preset", nargs="*", default=None, help="presets to compare (default: every preset in the store)")
    ap.add_argument("--where", nargs="*", default=[], help="keep only runs with these config values (key=value)")
    ap.add_argument("--attack", default="harmful-mix", help="the attack whose runs mirror the papers' tables")
    ap.add_argument("--split", default="test",
                    help="keep only runs scored on this eval.split ('' keeps every split; tune trials use validation)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--tol", type=float, default=0.0,
                    help="a change versus SFT of at most this many points counts as no change (sign 0)")
    return ap


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"bench.agreement: error: {exc}") from None
    done = [t for t in summary["tables"] if t["ratios"]]
    log.info("%d published table(s) × preset(s), %d with organism cells; %d of %d runs used; report in %s",
             len(summary["tables"]), len(done), summary["runs_used"], summary["runs_in_store"], args.out)
    for t in done:
        log.info("  %s [%s]: τ HS %s, sign ΔHS %s, sign ΔFA %s", t["table"], t["preset"], _tau(t["hs"]),
                 _sign(t["hs"]), _sign(t["fa"]))


if __name__ == "__main__":
    main()
