"""Batched vs one-prompt-at-a-time generation on the organism, and batches grouped by eval set vs
mixed: speed ratios and identical outputs.

    python bench/generation.py [--n 256] [--batch 128] [--max-new-tokens 40] [--model DIR]

Every run uses :class:`hftlab.eval.generate.HFGenerator` (greedy, KV cache) on the same held-out
harmful, task and benign prompts (a third each); batched runs sort by length and left-pad. "grouped"
batches one set at a time (as the evaluation does), "mixed" sorts all prompts together, so a batch
decodes until its longest answer (often a harmful one) ends. Prints seconds, prompts/s, the ratios and
how many outputs differ (0 expected). 1 torch thread, as in the tests.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="prompts (half harmful, half task)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="", help="a saved model folder, e.g. a run's finetune stage "
                    "(default: the organism's base model, which complies with every harmful prompt)")
    args = ap.parse_args(argv)

    import torch

    from hftlab.config import ModelConfig
    from hftlab.data.format import Formatter
    from hftlab.data.sources import get_source
    from hftlab.eval.generate import HFGenerator
    from hftlab.models.loading import load_model, load_tokenizer
    from hftlab.organism.build import ensure_organism

    torch.set_num_threads(args.threads)
    path = ensure_organism()
    folder = args.model or path  # a stage folder holds its tokenizer next to the weights
    model, tok = load_model(folder, ModelConfig()), load_tokenizer(folder, ModelConfig())
    src = get_source("organism")
    k = args.n // 3
    sets = {"harmful": [e.prompt for e in src.harmful("eval", k)],
            "task": [e.prompt for e in src.task("sentiment", "test", k)],
            "benign": [e.prompt for e in src.benign_eval(args.n - 2 * k)]}
    prompts = [p for v in sets.values() for p in v]
    groups = [name for name, v in sets.items() for _ in v]
    fmt = Formatter(tok, "auto", max_length=160)

    def timed(batch: int, grouped: bool) -> tuple[float, list[str]]:
        gen = HFGenerator(model, fmt, max_new_tokens=args.max_new_tokens, batch_size=batch, sort_by_length=batch > 1)
        gen.generate(prompts[: min(8, len(prompts))])  # warm-up
        start = time.perf_counter()
        out = gen.generate(prompts, groups=groups if grouped else None)
        return time.perf_counter() - start, out

    t_grouped, grouped = timed(args.batch, True)
    t_mixed, mixed = timed(args.batch, False)
    t_single, single = timed(1, False)
    differ = sum(len({a, b, c}) > 1 for a, b, c in zip(grouped, mixed, single))
    print(f"prompts: {len(prompts)}, max_new_tokens: {args.max_new_tokens}, threads: {args.threads}")
    for name, t in (("one at a time", t_single), (f"mixed ({args.batch})", t_mixed),
                    (f"grouped ({args.batch})", t_grouped)):
        print(f"{name:<16}: {t:8.2f} s  {len(prompts) / t:8.1f} prompts/s")
    print(f"batched vs one at a time: {t_single / t_mixed:6.1f}x   grouped vs mixed: {t_mixed / t_grouped:5.2f}x   "
          f"outputs that differ: {differ}/{len(prompts)}")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
