"""Cost of the data-level fine-tuning defenses (safeinstr, bea, ptst) vs SFT.

Run: ``python -m bench.data_defenses [--rounds 2 --epochs 2 --methods sft,safeinstr,bea,ptst]``.

These methods do not change the step, they change the data: SafeInstr and BEA append safety samples
(more steps per epoch), BEA's carry a 48-word trigger (longer, more padded batches), PTST only changes
the system prompt (none in training). So each method runs the pipeline's whole fine-tuning stage: in
ONE process, on the organism, a fresh LoRA copy of the same model trains on the default attack's data
(harmful-mix, p=0.1, n=1000) after ``prepare_data`` and the stage's system prompt, for the default
epochs at the default batch, ``--rounds`` times interleaved. The table gives the medians of the seconds
per optimiser step and of the whole fine-tuning time, their ratios to SFT's, the number of examples,
steps and trained tokens (the noise-free part of the cost), and the peak memory above the level before the method started (same probe
as ``bench.finetune_defenses``). Timings are noisy on a shared CPU: compare ratios of one run only.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
from dataclasses import replace
from typing import Any

import torch

from bench.finetune_defenses import PeakMemory
from hftlab import registry
from hftlab.config import AttackConfig, Config, ModelConfig, TrainConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, load_model, load_tokenizer
from hftlab.training.loop import train

METHODS = ("sft", "safeinstr", "bea", "ptst")


def stage_data(name: str, user: list, data: dict, fmt: Formatter) -> list:
    """The examples the fine-tuning stage trains on for defense ``name`` (as ``Pipeline._train``)."""
    defense = registry.get("defense", name)()
    ctx = Context(stage="finetune", formatter=fmt, data=data)
    out = defense.prepare_data("finetune", list(user), ctx)
    system = defense.system_prompt("finetune")
    return [replace(ex, system=system) for ex in out] if system else out


def run_one(base: torch.nn.Module, tok: Any, feats: list, tcfg: TrainConfig) -> dict[str, float]:
    with PeakMemory() as mem:
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        if tcfg.lora:
            model = add_lora(model, tcfg)
        res = train(model, feats, tcfg, seed=0, desc="bench", pad_id=tok.pad_token_id)
    del model
    return {"step": res.seconds / res.steps, "total": res.seconds, "steps": res.steps, "tokens": res.tokens,
            "mem": mem.delta}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=0.0, help="0: the default fine-tuning epochs")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from hftlab.organism.build import ensure_organism

    defaults = Config()
    path = str(ensure_organism())
    tok = load_tokenizer(path, ModelConfig())
    base = load_model(path, ModelConfig())
    source = get_source("organism")
    task = registry.get("task", defaults.task)()
    user = registry.get("attack", defaults.attack.name)().build(source, task, AttackConfig())
    data = {"alignment": source.alignment(defaults.data.alignment_n), "user": user}
    tcfg = copy.deepcopy(defaults.finetune)
    tcfg.epochs = args.epochs or tcfg.epochs
    fmt = Formatter(tok, max_length=tcfg.max_length)

    methods = [m for m in args.methods.split(",") if m]
    examples = {m: stage_data(m, user, data, fmt) for m in methods}
    feats = {m: fmt.encode_all(examples[m]) for m in methods}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            runs[m].append(run_one(base, tok, feats[m], tcfg))

    keys = ("step", "total", "steps", "tokens", "mem")
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in methods}
    sft = med.get("sft")
    where = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"\ndata-level defenses vs SFT: whole fine-tuning stage (LoRA, batch {tcfg.batch_size}, "
          f"{tcfg.epochs:g} epochs, {args.rounds} rounds, {where})")
    print(f"{'method':<11}{'examples':>9}{'steps':>7}{'tokens':>8}{'x SFT':>7}{'s/step':>9}{'x SFT':>7}"
          f"{'total s':>9}{'x SFT':>7}{'peak MB':>9}{'x SFT':>7}")
    for m in methods:
        r = med[m]

        def ratio(k: str) -> float:
            return r[k] / sft[k] if sft and sft[k] > 0 else float("nan")

        print(f"{m:<11}{len(examples[m]):>9}{int(r['steps']):>7}{int(r['tokens']):>8}{ratio('tokens'):>7.2f}"
              f"{r['step']:>9.4f}"
              f"{ratio('step'):>7.2f}{r['total']:>9.2f}{ratio('total'):>7.2f}{r['mem'] / 2**20:>9.1f}"
              f"{ratio('mem'):>7.2f}")


if __name__ == "__main__":
    main()
