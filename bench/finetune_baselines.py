"""Cost of the regularisation and gradient-surgery baselines (ewc, kl, asft, safegrad) vs SFT.

Run: ``python -m bench.finetune_baselines [--steps 30 --rounds 3 --methods sft,ewc,kl,asft,safegrad]``.

The protocol of :mod:`bench.finetune_defenses`: in ONE process, on the organism, each method fine-tunes a
fresh LoRA copy of the same model on the same user batches of the default attack (harmful-mix, p = 0.1,
n = 1000) for ``--steps`` optimiser steps, ``--rounds`` times interleaved; the table gives the median
seconds per optimiser step, its ratio to SFT's, the one-off setup time (EWC's Fisher pass over 2000
alignment rows, reference loading) and the peak memory above the level before the method started. The
aligned and base references are copies of the organism (AsFT's anchor is then zero: its cost is the same).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
from typing import Any

import torch

from bench.finetune_defenses import PeakMemory
from hftlab import registry
from hftlab.config import AttackConfig, Config, ModelConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, load_model, load_tokenizer
from hftlab.training.loop import train

METHODS = ("sft", "ewc", "kl", "asft", "safegrad")


def run_one(name: str, base: torch.nn.Module, tok: Any, feats: list, data: dict, tcfg: Any) -> dict:
    defense = registry.get("defense", name)()
    with PeakMemory() as mem:
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        model = add_lora(model, tcfg)
        ctx = Context(stage="finetune", formatter=Formatter(tok, max_length=tcfg.max_length), data=data,
                      loaders={"aligned": lambda: copy.deepcopy(base), "base": lambda: copy.deepcopy(base)},
                      batch_size=tcfg.batch_size)
        wall = time.perf_counter()
        res = train(model, feats, tcfg, defense=defense if name != "sft" else None, ctx=ctx, seed=0,
                    desc=name, pad_id=tok.pad_token_id)
        wall = time.perf_counter() - wall
    del model, ctx
    return {"step": res.seconds / res.steps, "setup": wall - res.seconds, "mem": mem.delta}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"rows among {', '.join(METHODS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    methods = [m for m in args.methods.split(",") if m]
    if "sft" not in methods or any(m not in METHODS for m in methods):
        ap.error(f"--methods: rows among {', '.join(METHODS)}, sft included")

    from hftlab.organism.build import ensure_organism

    path = str(ensure_organism())
    tok, base = load_tokenizer(path, ModelConfig()), load_model(path, ModelConfig())
    defaults = Config()
    source = get_source("organism")
    user = registry.get("attack", "harmful-mix")().build(source, registry.get("task", "sentiment")(), AttackConfig())
    data = {"alignment": source.alignment(defaults.data.alignment_n), "user": user}
    tcfg = copy.deepcopy(defaults.finetune)
    tcfg.max_steps = args.steps
    feats = Formatter(tok, max_length=tcfg.max_length).encode_all(user)

    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            runs[m].append(run_one(m, base, tok, feats, data, tcfg))
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("step", "setup", "mem")} for m in methods}
    where = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"\nfine-tuning step cost vs SFT (LoRA, batch {tcfg.batch_size}, {args.steps} steps x {args.rounds} "
          f"rounds, {where})")
    print(f"{'method':<10}{'s/step':>9}{'x SFT':>8}{'setup s':>9}{'peak MB':>9}")
    for m in methods:
        r = med[m]
        print(f"{m:<10}{r['step']:>9.4f}{r['step'] / med['sft']['step']:>8.2f}{r['setup']:>9.2f}"
              f"{r['mem'] / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
