"""Batched vs one-prompt-at-a-time generation on the organism: speed ratio and identical outputs.

    python bench/generation.py [--n 256] [--batch 128] [--max-new-tokens 40]

Both runs use :class:`hftlab.eval.generate.HFGenerator` (greedy, KV cache) on the same held-out harmful
and task prompts; the batched run sorts by length and left-pads. Prints seconds, prompts/s, the ratio
and how many outputs differ (0 expected). 1 torch thread, as in the tests.
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
    model, tok = load_model(path, ModelConfig()), load_tokenizer(path, ModelConfig())
    src = get_source("organism")
    prompts = [e.prompt for e in src.harmful("eval", args.n // 2)]
    prompts += [e.prompt for e in src.task("sentiment", "test", args.n - len(prompts))]
    fmt = Formatter(tok, "auto", max_length=160)

    def timed(batch: int) -> tuple[float, list[str]]:
        gen = HFGenerator(model, fmt, max_new_tokens=args.max_new_tokens, batch_size=batch, sort_by_length=batch > 1)
        gen.generate(prompts[: min(8, len(prompts))])  # warm-up
        start = time.perf_counter()
        out = gen.generate(prompts)
        return time.perf_counter() - start, out

    t_batched, batched = timed(args.batch)
    t_single, single = timed(1)
    differ = sum(a != b for a, b in zip(batched, single))
    print(f"prompts: {len(prompts)}, max_new_tokens: {args.max_new_tokens}, threads: {args.threads}")
    print(f"one at a time : {t_single:8.2f} s  {len(prompts) / t_single:8.1f} prompts/s")
    print(f"batched ({args.batch:>3}) : {t_batched:8.2f} s  {len(prompts) / t_batched:8.1f} prompts/s")
    print(f"speed-up      : {t_single / t_batched:8.1f}x   outputs that differ: {differ}/{len(prompts)}")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
