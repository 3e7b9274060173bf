"""The ``hftlab analyze`` command: which runs to analyse (a config or sweep grid run/reused through the
pipeline, finished run folders, or model paths), which analyses, where to write the report.

    hftlab analyze                                           # the default organism run, every analysis
    hftlab analyze attack.ratio=0,0.05,0.1,0.2 seed=0,1,2 out_dir=runs --jobs 1 --only drift,shallow
    hftlab analyze --run runs/runs/<id> --run runs/runs/<id2>
    hftlab analyze --aligned org/chat-model --final ./my-finetune --base org/base-model --only drift,weights

Imports nothing heavy at module level (``hftlab --help`` stays instant).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML config file (repeatable); KEY=V1,V2 overrides make a sweep")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides (comma lists: a sweep grid)")
    p.add_argument("--run", action="append", default=[], metavar="DIR",
                   help="a finished run folder (<out_dir>/runs/<id>, with result.json); repeatable")
    p.add_argument("--aligned", default="", help="aligned model (path or hub id) to analyse without a run")
    p.add_argument("--final", default="", help="fine-tuned model (path or hub id), with --aligned")
    p.add_argument("--base", default="", help="base (pre-alignment) model, with --aligned (optional)")
    p.add_argument("--only", default="", help="comma-separated analyses (default: all): "
                   "drift,shallow,gradients,weights,basin,refusal,dynamics")
    p.add_argument("--out", default="reports/analysis", help="report folder (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="sweep cells computed in parallel (default: 1)")
    p.add_argument("--quick", action="store_true", help="small samples (a smoke test, not a measurement)")
    p.add_argument("--param", action="append", default=[], metavar="ANALYSIS.KEY=VALUE",
                   help="an analysis's keyword argument, e.g. basin.n_prompts=48 or shallow.ks=[0,1,2] (repeatable)")
    p.add_argument("--card", default="", metavar="FILE",
                   help="also write the validity card (Markdown) from a sweep over attack.ratio and seeds")


def subjects_from_args(args: argparse.Namespace) -> list[Any]:
    """The runs to analyse, in order: run folders, model paths, or the config (a sweep grid when a value
    is a comma list; missing cells are computed, cached ones reused)."""
    from ..config import load_config
    from . import AnalysisError
    from .common import subject_from_config, subject_from_paths, subject_from_run

    if args.run:
        return [subject_from_run(r) for r in args.run]
    if args.aligned or args.final:
        if not (args.aligned and args.final):
            raise AnalysisError("--aligned and --final go together")
        return [subject_from_paths(args.aligned, args.final, args.base, load_config(args.config, args.overrides))]
    grid = [o for o in args.overrides if "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[")]
    if not grid:
        return [subject_from_config(load_config(args.config, args.overrides))]
    from ..sweep import plan, run_cells

    fixed = [o for o in args.overrides if o not in grid]
    cells = plan(args.config, grid, fixed)
    run_cells(cells, args.config, jobs=args.jobs, desc="analyze: runs")
    return [subject_from_config(c.cfg) for c in cells]


def parse_params(items: list[str], quick: bool) -> dict[str, dict[str, Any]]:
    """``--param`` values (YAML-parsed) on top of the defaults or of ``--quick``'s sizes."""
    import copy

    import yaml

    from . import QUICK, AnalysisError, module

    params = copy.deepcopy(QUICK) if quick else {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, arg = key.partition(".")
        if not (sep and dot and arg):
            raise AnalysisError(f"--param {item!r}: expected ANALYSIS.KEY=VALUE")
        import inspect

        if arg not in inspect.signature(module(name).run).parameters:
            raise AnalysisError(f"--param {item!r}: '{name}' has no parameter '{arg}'")
        value = yaml.safe_load(raw)
        params.setdefault(name, {})[arg] = tuple(value) if isinstance(value, list) else value
    return params


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this report (for the index and the card)."""
    parts = ["hftlab analyze", *[f"-c {c}" for c in args.config], *args.overrides, *[f"--run {r}" for r in args.run]]
    parts += [f"--{k} {getattr(args, k)}" for k in ("aligned", "final", "base", "only", "card") if getattr(args, k)]
    parts += [f"--jobs {args.jobs}", f"--out {args.out}", *(["--quick"] if args.quick else [])]
    parts += [f"--param '{p}'" for p in args.param]
    return " ".join(parts)


def main(args: argparse.Namespace) -> int:
    from . import NAMES, analyze

    from . import module

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    for n in names:  # a bad name fails before any run is loaded or computed
        module(n)
    params = parse_params(args.param, args.quick)
    start = time.time()
    subjects = subjects_from_args(args)
    index = analyze(subjects, Path(args.out), names, params, command=_command(args))
    if args.card:
        from .card import write_card

        write_card(Path(args.out), Path(args.card), seconds=time.time() - start)
    total = time.time() - start
    log.info("analyze: %d run(s), %.0f s (%s)", len(subjects), total,
             ", ".join(f"{k} {v:.0f} s" for k, v in index["seconds"].items()))
    print(f"report: {args.out}/ (index.json, <run>/<analysis>.json|png"
          f"{', <analysis>_summary.json|png' if len(subjects) > 1 else ''}); {total:.0f} s")
    return 0
