"""Cost of the fine-tuning-stage training defenses (lisa, ldifs, constrained-sft, freeze) vs SFT.

Run: ``python -m bench.finetune_defenses [--steps 30 --rounds 3 --full --model PATH]``.

In ONE process, on the organism (or ``--model``), each method fine-tunes a fresh copy of the same model
(LoRA by default, as the pipeline's fine-tuning stage) on the same user batches of the default attack
(harmful-mix, p=0.1, n=1000) for ``--steps`` optimiser steps, ``--rounds`` times interleaved. Lisa has
two rows, one per state: ``lisa`` (its fine-tuning state: SFT's batches + the proximal term; 90 % of
its steps at the defaults) and ``lisa:align`` (its alignment state: an alignment batch instead). The table
gives the median seconds per optimiser step, its ratio to SFT's, the one-off setup time (reference
loading, Freeze's probe), and the peak memory above the process's level before the method started
(CUDA: ``max_memory_allocated``; CPU: peak RSS sampled every 2 ms, after ``malloc_trim``).
Cost targets: Lisa ≤ 1.1×, LDIFS and Constrained SFT ≤ 1.8× SFT's step time.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import logging
import os
import statistics
import threading
import time
from typing import Any, Callable

import torch

from hftlab import registry
from hftlab.config import AttackConfig, ModelConfig, TrainConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, load_model, load_tokenizer
from hftlab.training.loop import train

# row label -> (defense, params). Lisa runs in each of its two states: "lisa" = fine-tuning state (the
# user's batches, as SFT, plus the proximal term: 90 % of its steps by default), "lisa:align" = the
# alignment state (a batch of the alignment set instead, plus the proximal term).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sft": ("sft", {}),
    "lisa": ("lisa", {"alignment_step": 0}),
    "lisa:align": ("lisa", {"alignment_step": 10**9}),
    "ldifs": ("ldifs", {}),
    "constrained-sft": ("constrained-sft", {}),
    "freeze": ("freeze", {}),
}
TARGETS = {"lisa": 1.1, "lisa:align": 1.1, "ldifs": 1.8, "constrained-sft": 1.8}


class PeakMemory:
    """Peak memory (bytes) above the level at ``__enter__``: CUDA allocator, else sampled RSS."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed arenas back so the baseline is honest
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.delta = self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(name: str, params: dict[str, Any], base: torch.nn.Module, tok: Any, feats: list, data: dict,
            tcfg: TrainConfig) -> dict:
    """One fine-tuning of a fresh copy of ``base`` by defense ``name``: seconds per optimiser step, the
    one-off setup seconds and the peak memory above the level before it (the references are copies of
    ``base``, loaded only if the defense asks)."""
    defense = registry.get("defense", name)(**params)
    with PeakMemory() as mem:
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        if tcfg.lora:
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


def medians(rows: list[str], rounds: int, run: Callable[[str], dict]) -> dict[str, dict[str, float]]:
    """``run(row)`` for every row, ``rounds`` times interleaved; the median of each measure per row."""
    runs: dict[str, list[dict]] = {m: [] for m in rows}
    for _ in range(rounds):
        for m in rows:
            runs[m].append(run(m))
    return {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("step", "setup", "mem")} for m in rows}


def bench_inputs(path: str, steps: int, lora: bool = True) -> tuple[str, Any, torch.nn.Module, list, dict, TrainConfig]:
    """(model folder, tokenizer, model, features, data, fine-tuning config) of the model at ``path`` (default: the
    organism) and the default attack's upload (harmful-mix, p = 0.1, n = 1000), for ``steps`` steps."""
    from hftlab.config import Config

    defaults = Config()
    if not path:
        from hftlab.organism.build import ensure_organism

        path = str(ensure_organism())
    tok = load_tokenizer(path, ModelConfig())
    base = load_model(path, ModelConfig())
    source = get_source("organism")
    user = registry.get("attack", "harmful-mix")().build(source, registry.get("task", "sentiment")(), AttackConfig())
    data = {"alignment": source.alignment(defaults.data.alignment_n), "user": user}
    tcfg = copy.deepcopy(defaults.finetune)
    tcfg.max_steps, tcfg.lora = steps, lora
    feats = Formatter(tok, max_length=tcfg.max_length).encode_all(user)
    return path, tok, base, feats, data, tcfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--model", default="", help="model folder (default: the organism)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"rows among {', '.join(METHODS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(METHODS)}")
    path, tok, base, feats, data, tcfg = bench_inputs(args.model, args.steps, lora=not args.full)
    med = medians(methods, args.rounds, lambda m: run_one(*METHODS[m], base, tok, feats, data, tcfg))
    sft = med.get("sft")
    where = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"\nfine-tuning step cost vs SFT ({'full' if args.full else 'LoRA'}, batch {tcfg.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds, {where}, model {os.path.basename(path)})")
    print(f"{'method':<16}{'s/step':>9}{'x SFT':>8}{'target':>8}{'setup s':>9}{'peak MB':>9}{'x SFT':>8}")
    for m in methods:
        r = med[m]
        ratio = r["step"] / sft["step"] if sft else float("nan")
        mem_ratio = r["mem"] / sft["mem"] if sft and sft["mem"] > 0 else float("nan")
        target = f"<={TARGETS[m]}" if m in TARGETS else ""
        print(f"{m:<16}{r['step']:>9.4f}{ratio:>8.2f}{target:>8}{r['setup']:>9.2f}{r['mem'] / 2**20:>9.1f}"
              f"{mem_ratio:>8.2f}")


if __name__ == "__main__":
    main()
