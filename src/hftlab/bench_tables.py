"""The bench's verdict tables, from run results (pure: no runs here).

- :func:`paired_table`: one row per method and preset (paper defaults, tuned): HS and FA means, the mean
  paired difference to SFT at the same seed with its 95 % interval (ΔHS, ΔFA), and the verdict of
  :func:`hftlab.verdict.verdict`.
- :func:`per_seed_table`: the raw numbers behind it, one row per run.
- :func:`worst_case_table`: per method, the attacker setting with the highest HS among those that keep
  the task learnt (FA within 5 points of SFT's at p = 0 under the same setting).
"""
from __future__ import annotations

import statistics
from typing import Any, Collection, Mapping, Sequence

from . import registry
from .report import value
from .verdict import FA_MARGIN, mean_interval, paired, verdict, worst_case

HEADER = ["method", "preset", "stage", "HS (%)", "FA (%)", "ΔHS vs SFT [95 % CI]", "ΔFA vs SFT [95 % CI]",
          "verdict", "seeds"]


def preset_of(r: dict[str, Any]) -> str:
    return value(r, "defense.preset") or "paper"


def _by_seed(rs: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
    return {value(r, "seed"): r[key] for r in rs}


def paired_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, preset): means, paired intervals against SFT and the verdict, as plain data."""
    sft = [r for r in results if value(r, "defense.name") == "sft"]
    sft_hs, sft_fa = _by_seed(sft, "harmful_score"), _by_seed(sft, "finetune_accuracy")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((value(r, "defense.name"), preset_of(r)), []).append(r)
    order = {n: i for i, n in enumerate(registry.names("defense"))}
    out = []
    for (name, preset), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 999), kv[0][1])):
        row = {"method": name, "preset": preset, "stage": registry.entry("defense", name).stage,
               "hs": statistics.fmean(r["harmful_score"] for r in rs),
               "fa": statistics.fmean(r["finetune_accuracy"] for r in rs), "seeds": len(rs)}
        if name != "sft":
            dhs = paired(_by_seed(rs, "harmful_score"), sft_hs)
            dfa = paired(_by_seed(rs, "finetune_accuracy"), sft_fa)
            if dhs:
                row["dhs"], row["dfa"] = mean_interval(dhs), mean_interval(dfa)
                row["verdict"] = verdict(row["dhs"], row["dfa"])
        out.append(row)
    return out


def paired_table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    body = []
    for r in paired_rows(results):
        body.append([r["method"], r["preset"], r["stage"], f"{r['hs']:.1f}", f"{r['fa']:.1f}",
                     r["dhs"].fmt() if "dhs" in r else "–", r["dfa"].fmt() if "dfa" in r else "–",
                     r.get("verdict", "reference"), str(r["seeds"])])
    return HEADER, body


def per_seed_table(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows = sorted(results, key=lambda r: (value(r, "defense.name"), preset_of(r), value(r, "seed")))
    body = [[value(r, "defense.name"), preset_of(r), str(value(r, "seed")), f"{r['harmful_score']:.1f}",
             f"{r['finetune_accuracy']:.1f}", f"{(r.get('aligned') or {}).get('harmful_score', float('nan')):.1f}"]
            for r in rows]
    return ["method", "preset", "seed", "HS (%)", "FA (%)", "aligned HS (%)"], body


def worst_case_table(by_setting: dict[str, Sequence[dict[str, Any]]], benign: dict[str, Sequence[dict[str, Any]]],
                     methods: Sequence[tuple[str, str]], cannot: Mapping[str, Collection[str]] | None = None
                     ) -> tuple[list[str], list[list[str]]]:
    """``by_setting[setting]``: the methods' runs under that attacker setting; ``benign[setting]``: SFT at
    p = 0 under it; ``cannot[setting]``: the methods not defined under it ("n/a"). HS and FA are means over
    the seeds run; a setting counts for a method when its FA is within 5 points of SFT's benign FA under
    the same setting."""
    ref = {s: statistics.fmean(r["finetune_accuracy"] for r in rs) for s, rs in benign.items() if rs}
    body = []
    for name, preset in methods:
        res = {}
        for s, rs in by_setting.items():
            mine = [r for r in rs if value(r, "defense.name") == name and preset_of(r) == preset]
            if mine:
                res[s] = (statistics.fmean(r["harmful_score"] for r in mine),
                          statistics.fmean(r["finetune_accuracy"] for r in mine))
        worst = worst_case(res, ref)
        dropped = [s for s, (_, fa) in res.items() if s in ref and fa < ref[s] - FA_MARGIN]
        cells = [f"{res[s][0]:.1f} / {res[s][1]:.1f}" if s in res else "n/a" if name in (cannot or {}).get(s, ())
                 else "–" for s in by_setting]
        body.append([name, preset, *cells, f"{worst[1]:.1f} ({worst[0]})" if worst else "–",
                     ", ".join(dropped) or "none"])
    header = ["method", "preset", *(f"{s}: HS / FA" for s in by_setting), "worst-case HS (setting)",
              "settings not counted (task not learnt)"]
    return header, body
