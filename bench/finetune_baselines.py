"""Cost of the regularisation, gradient-surgery and adapter baselines (ewc, kl, asft, safegrad, salora) vs SFT.

Run: ``python -m bench.finetune_baselines [--steps 30 --rounds 3 --methods sft,ewc,kl,asft,safegrad,salora]``.

The protocol of :mod:`bench.finetune_defenses`: in ONE process, on the organism, each method fine-tunes a
fresh LoRA copy of the same model on the same user batches of the default attack (harmful-mix, p = 0.1,
n = 1000) for ``--steps`` optimiser steps, ``--rounds`` times interleaved; the table gives the median
seconds per optimiser step, its ratio to SFT's, the one-off setup time (EWC's Fisher pass over 2000
alignment rows, reference loading) and the peak memory above the level before the method started. The
aligned and base references are copies of the organism (AsFT's anchor is then zero: its cost is the same).
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from bench.finetune_defenses import bench_inputs, medians, run_one

METHODS = ("sft", "ewc", "kl", "asft", "safegrad", "salora")


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

    _, tok, base, feats, data, tcfg = bench_inputs("", args.steps)
    med = medians(methods, args.rounds, lambda m: run_one(m, {}, base, tok, feats, data, tcfg))
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
