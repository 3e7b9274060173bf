"""The ``hftlab`` command line (``hftlab --help`` lists its subcommands).

Heavy imports (torch, transformers) happen inside commands, so ``--help`` and ``list`` are instant.
Every command runs on the organism when given no config at all.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

from .errors import UserError

log = logging.getLogger("hftlab")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML config file, or a shipped config by name: defenses/lisa, experiments/sft "
                        "(repeatable; later files win)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. defense=lisa defense.rho=1 attack.ratio=0.2 finetune.lr=1e-4")


def _executor_args(p: argparse.ArgumentParser) -> None:
    from .executors import add_args

    add_args(p)


class _Parser(argparse.ArgumentParser):
    """The top-level parser: its description names the subcommands registered when help is shown, so
    the list cannot go stale when a subcommand is added."""

    def format_help(self) -> str:
        names = [name for a in self._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]
        if names:  # the subcommands' parsers are of this class too; they keep their own description
            self.description = f"hftlab, a harmful fine-tuning lab. Commands: {', '.join(names)}."
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        """A bad flag or command is one line, ``hftlab: error: …``, as every other user error (no usage block)."""
        raise UsageError(f"{message} (see: {self.prog} --help)")


class UsageError(UserError):
    """A bad command line (unknown command or flag, a flag's bad value)."""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--jobs 0`` would start no worker, ``-1`` is meaningless)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


BENCH_SEEDS = 5  # held-out seeds of the bench (the paired-interval width at SFT's measured spread)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hftlab")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="align → finetune → repair → evaluate one config (default: the organism)")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs on stderr)")

    p = sub.add_parser("validate", help="check a config and print it resolved")
    _config_args(p)

    p = sub.add_parser("sweep", help="a grid over config keys (KEY=V1,V2 …), parallel, resumable")
    _config_args(p)
    p.add_argument("--jobs", type=positive_int, default=1, help="cells run in parallel (1 torch thread each)")
    _executor_args(p)

    p = sub.add_parser("bench", help="the survey's comparison on the organism: table, p-curves, stress, overheads")
    p.add_argument("--quick", action="store_true", help="2 seeds, the worst case on 1 (a smoke run: wide intervals)")
    p.add_argument("--seeds", type=positive_int, default=BENCH_SEEDS,
                   help="held-out seeds 0 … N-1 (default: %(default)s; see docs/results.md for why)")
    p.add_argument("--worst-seeds", type=positive_int, default=2, help="seeds of the worst-case attacker (default: %(default)s)")
    p.add_argument("--jobs", type=positive_int, default=2, help="cells run in parallel (1 torch thread each)")
    p.add_argument("--out", default="reports/bench", help="report folder (default: %(default)s)")
    p.add_argument("--runs", default="runs", help="run folders and store (default: %(default)s)")
    p.add_argument("--no-sweeps", action="store_true", help="main table only (no p-sweep, no stress)")
    p.add_argument("--defenses", default="", help="comma-separated subset (default: every registered defense)")
    _executor_args(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every cell")

    p = sub.add_parser("tune", help="calibrate each defense's strength on the organism (validation seeds and "
                                    "prompts) and write configs/organism/tuned/<name>.yaml")
    p.add_argument("defenses", nargs="*", metavar="DEFENSE",
                   help="defenses to tune (default: every one whose configs/defenses/<name>.yaml has a tune: grid)")
    p.add_argument("--seeds", default="100,101,102", help="validation seeds, never the report's (default: %(default)s)")
    p.add_argument("--jobs", type=positive_int, default=2, help="cells run in parallel (1 torch thread each)")
    p.add_argument("--runs", default="runs", help="run folders and store (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="an override for every cell (repeatable)")

    p = sub.add_parser("organism", help="the built-in organism: where it is, rebuild it from its world, pin a build")
    p.add_argument("action", choices=("path", "build", "pin"),
                   help="path: the cached organism (installing the shipped one if needed); build: rebuild it from "
                        "the world into --out (about 8 min on one core); pin: ship the build in --out with hftlab")
    p.add_argument("--out", default="", help="folder for build (empty or new) and pin")

    sub.add_parser("list", help="registered defenses, attacks, judges and tasks by stage")

    p = sub.add_parser("report", help="tables from the results store")
    p.add_argument("--store", default="runs/results.sqlite", help="SQLite store (default: %(default)s)")
    p.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown")
    p.add_argument("--by", default="auto",
                   help="columns or config keys to group by first (e.g. defense,finetune.lr); the default "
                        "grouping is always kept: model (an organism build by its hash), defense, attack, "
                        "task, ratio, n and every config key that differs between runs, so runs of "
                        "different ratios are never one mean. Seeds are averaged; rows are sorted by these keys")
    p.add_argument("--average-over", default="", metavar="KEYS",
                   help="keys to average over instead of grouping by them (e.g. ratio,attack): "
                        "only what is named here is merged into one mean")

    p = sub.add_parser("analyze", help="mechanistic analyses (drift, shallow KL, gradients, weights, basin, "
                                       "refusal direction, dynamics) of runs, a sweep, or any models: JSON + PNG")
    from .analysis.command import add_arguments

    add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # KEY=VALUE overrides may also come after the flags (``run --json seed=1``)
            if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides += extra
    except UsageError as e:
        print(f"hftlab: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:  # one line for the errors users cause; a traceback for our bugs
        print(f"hftlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hftlab: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .pipeline import run

    result = run(cfg)
    from .runtime import accelerator

    if not accelerator().is_main_process:
        return 0
    table = summary_table(result)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items() if k != "aligned_metrics"}, default=str))
    else:
        print(table)
    return 0


def summary_table(result: dict[str, Any]) -> str:
    from .report import render

    stages = render(["stage", "seconds", "cached"],
                    [[s["name"], f"{s['seconds']:.1f}", "yes" if s["cached"] else "no"] for s in result["stages"]])
    a, m = result.get("aligned") or {}, result
    f = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    metrics = render(["model", "harmful score (HS %)", "fine-tune accuracy (FA %)"],
                     [["aligned", f(a.get("harmful_score")), f(a.get("finetune_accuracy"))],
                      ["final", f(m["harmful_score"]), f(m["finetune_accuracy"])]])
    return f"\n{stages}\n{metrics}\nrun folder: {result['run_dir']}\n"


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    for kind in registry.KINDS:
        print(f"{kind}s:")
        for stage in registry.STAGE_ORDER:
            for e in registry.entries(kind):
                if e.stage == stage:
                    print(f"  {e.name:<16} [{stage}] {e.paper}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import store
    from .preflight import store_file
    from .report import render, report_groups, summarise

    store_file(args.store, "--store", must_exist=True)  # a missing or non-SQLite file: one line, no traceback
    rows = store.rows(args.store)
    if not rows:
        print(f"hftlab: no runs in {args.store}", file=sys.stderr)
        return 1
    keys = lambda text: [k.strip() for k in text.split(",") if k.strip() and k.strip() != "auto"]  # noqa: E731
    by = report_groups(rows, keys(args.by), keys(args.average_over))
    header, body = summarise(rows, by=by)
    print(render(header, body, args.format), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .report import render, summarise
    from .sweep import run_sweep

    grid = [o for o in args.overrides if "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[")]
    fixed = [o for o in args.overrides if o not in grid]
    from .executors import from_args

    results = run_sweep(args.config, grid, fixed, jobs=args.jobs, executor=from_args(args))
    keys = [g.split("=", 1)[0] for g in grid if g.split("=", 1)[0] != "seed"]
    by = [{"defense": "defense.name", "attack": "attack.name"}.get(k, k) for k in keys] or ["defense.name"]
    header, body = summarise(results, by=by)
    print(render(header, body), end="")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench_suite import run_bench
    from .preflight import writable_folder

    writable_folder(args.out, "--out")  # the report is written last, after every cell
    seeds = (0, 1) if args.quick else tuple(range(args.seeds))
    subset = [d for d in args.defenses.split(",") if d] or None
    from .executors import from_args

    out = run_bench(Path(args.out), seeds, args.jobs, args.runs, args.overrides, sweeps=not args.no_sweeps,
                    defenses=subset, executor=from_args(args), worst_seeds=1 if args.quick else args.worst_seeds)
    print((out / "table.md").read_text())
    print(f"report: {out}/ (table.md, table.csv, table.tex, *.png)")
    return 0


def cmd_organism(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import UserError
    from .organism import build

    if args.action == "path":
        print(build.ensure_organism())
        return 0
    if not args.out:
        raise UserError(f"--out: 'hftlab organism {args.action}' needs a folder")
    out = Path(args.out)
    if args.action == "build":
        if (out / "manifest.json").is_file():
            raise UserError(f"--out: {out} already holds an organism; give an empty or new folder")
        print(build.rebuild(out))
    else:
        if not (out / "manifest.json").is_file():
            raise UserError(f"--out: {out} holds no organism build (run 'hftlab organism build --out {out}')")
        print(build.pin(out))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tune
    from .errors import UserError

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got '{args.seeds}'") from None
    defenses = args.defenses or tune.tunable()
    tables = tune.run_tune(defenses, seeds, args.jobs, args.runs, args.overrides)
    print(tune.summary(tables))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis.command import main as analyze_main

    return analyze_main(args)


COMMANDS = {"organism": cmd_organism, "tune": cmd_tune, "analyze": cmd_analyze, "run": cmd_run, "sweep": cmd_sweep, "bench": cmd_bench, "validate": cmd_validate, "list": cmd_list, "report": cmd_report}

if __name__ == "__main__":
    sys.exit(main())
