"""Cost of the post-fine-tuning defenses relative to one fine-tuning run, in one process.

Run: ``python -m bench.repair_defenses [--out-dir runs --seed 0 --methods safelora safemerge:threshold=0.6]``
(``name:key=value:key=value`` sets a method's parameters for its row).

On the organism with the default config: the aligned model comes from the pipeline's align stage (cached
in ``--out-dir``); then, in this process, one LoRA fine-tuning run of the default attack (harmful-mix,
p=0.1, n=1000, SST2-like task) is timed, and its merged model is what every repair gets. A repair's cost
is its whole stage work: loading the fine-tuned model, the aligned/base references it asks for, its data,
and ``repair`` itself (saving excluded). Panacea acts in fine-tuning, so its row is its own fine-tuning
run. Peak memory is measured above the process's level before each phase (CUDA: max allocated; CPU:
sampled RSS, see ``bench.finetune_defenses.PeakMemory``), after a short unmeasured warm-up fine-tuning
so that the first phase does not pay the allocator's one-off growth alone.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from bench.finetune_defenses import PeakMemory
from hftlab import registry
from hftlab.config import load_config
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, save
from hftlab.pipeline import Pipeline
from hftlab.training.loop import train

log = logging.getLogger("bench.repair_defenses")
METHODS = ("safelora", "antidote", "resta", "safemerge", "safedelta", "nlsr", "panacea")


def measure(work: Callable[[], Any]) -> tuple[float, int, Any]:
    """(wall seconds, peak bytes above the start, result) of ``work()``."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        out = work()
        wall = time.perf_counter() - start
    return wall, mem.delta, out


def finetune(p: Pipeline, aligned: Path, defense: Any = None, steps: int = 0) -> torch.nn.Module:
    """One fine-tuning run of the configured attack from the aligned model (as the pipeline's stage)."""
    cfg = copy.deepcopy(p.cfg)
    cfg.finetune.max_steps = steps or cfg.finetune.max_steps
    data = registry.get("attack", cfg.attack.name)().build(p.source, p.task, cfg.attack)
    fmt = p.formatter(cfg.finetune.max_length)
    ctx = Context(stage="finetune", formatter=fmt, data={**p._needs(defense or registry.get("defense", "sft")(),
                                                                      "finetune"), "user": data},
                  batch_size=cfg.finetune.batch_size)
    model = p.load(aligned)
    torch.manual_seed(cfg.seed)
    model = add_lora(model, cfg.finetune)
    train(model, fmt.encode_all(data), cfg.finetune, defense=defense, ctx=ctx, seed=cfg.seed,
          desc=defense.name if defense else "sft", pad_id=p.tokenizer.pad_token_id)
    return model


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value:key=value`` -> (name, params)."""
    name, *pairs = text.split(":")
    return name, {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs)}


def repair(p: Pipeline, defense: Any, aligned: Path, finetuned: Path) -> dict[str, Any]:
    """The repair stage's work for ``defense`` (as ``Pipeline.repair``, without saving)."""
    cfg = p.cfg
    ctx = Context(stage="repair", formatter=p.formatter(cfg.finetune.max_length), seed=cfg.seed,
                  data=p._needs(defense, "repair"), batch_size=cfg.finetune.batch_size,
                  loaders={"aligned": lambda: p.load(aligned), "base": lambda: p.load(p.base_path)})
    ctx.state["finetuned_path"] = str(finetuned)
    defense.repair(p.load(finetuned), ctx)
    return ctx.state.get("repair_metrics", {})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs", help="pipeline folder (its align stage is reused when cached)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), metavar="NAME[:KEY=VALUE...]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("hftlab").setLevel(logging.WARNING)
    cfg = load_config(overrides=[f"out_dir={args.out_dir}", f"seed={args.seed}"])
    p = Pipeline(cfg)
    aligned = p.align()

    finetune(p, aligned, steps=5)  # warm-up, not measured
    ft_s, ft_mem, model = measure(lambda: finetune(p, aligned))
    rows = [("fine-tuning (sft)", ft_s, ft_mem, "")]
    with tempfile.TemporaryDirectory() as tmp:
        finetuned = Path(tmp) / "finetuned"
        save(model, p.tokenizer, finetuned)
        del model
        for label in args.methods:
            name, params = parse_method(label)
            defense = registry.get("defense", name)(**params)
            if "repair" in defense.stages:
                s, mem, metrics = measure(lambda: repair(p, defense, aligned, finetuned))
                rows.append((f"repair {label}", s, mem, _short(metrics)))
            else:
                s, mem, _ = measure(lambda: finetune(p, aligned, defense))
                rows.append((f"fine-tuning {label}", s, mem, "whole fine-tuning run"))
    where = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} thread(s)"
    lines = [f"post-fine-tuning defenses vs one fine-tuning run (organism, {where}, seed {args.seed})",
             f"{'phase':<34}{'seconds':>9}{'x FT':>8}{'peak MB':>9}{'x FT':>8}  notes"]
    for label, s, mem, note in rows:
        mem_ratio = mem / ft_mem if ft_mem > 0 else float("nan")
        lines.append(f"{label:<34}{s:>9.2f}{s / ft_s:>8.3f}{mem / 2**20:>9.1f}{mem_ratio:>8.2f}  {note}")
    log.info("\n%s", "\n".join(lines))


def _short(metrics: dict[str, Any]) -> str:
    keys = ("projected_layers", "merged_layers", "layers", "pruned_fraction", "gamma")
    return " ".join(f"{k}={metrics[k]:.3g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                    for k in keys if k in metrics)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
