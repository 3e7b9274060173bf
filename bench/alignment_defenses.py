"""Alignment-stage defenses: step time as a ratio to SFT's, and peak memory, in ONE process.

    python -m bench.alignment_defenses [--steps 12] [--batch-size 32] [--lora] [--harmful-like-alignment]
    python -m bench.alignment_defenses --shape llama-1b --lora   # on a GPU: the methods at 1B scale

Every method trains a fresh copy of the organism (full fine-tuning, as the default align stage, or
LoRA with ``--lora``) on the SAME pre-built alignment batches with the loop's optimiser step, so the
ratio is the defense's own overhead. The methods take turns on each batch and each reports its
median step, in process CPU time on CPU (robust to other work on the shared cores), wall time on
CUDA. Peak memory is the rise of the process's peak resident set over one method's setup and first
steps, the peak being reset before each method via /proc/self/clear_refs (on CUDA:
``torch.cuda.max_memory_allocated``).

The organism's harmful answers are about twice as long as its alignment examples, so each harmful
pass costs about 1.6× an alignment pass; ``--harmful-like-alignment`` draws the "harmful" batches
from the alignment set instead (same lengths), to show the methods' pass overhead on its own.

``--shape llama-1b`` replaces the organism's weights by a randomly initialised Llama of the Llama-3.2-1B
shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192; the organism's vocabulary, so the
embedding is small) in bf16 on a GPU: the same data and methods, at a size where a
GPU is busy with the matrices rather than with kernel launches.

Cost targets: Vaccine ≤ 1.8×, Booster ≤ 3.1×, RepNoise ≤ 2.2×, T-Vaccine below Vaccine in memory.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hftlab import registry
from hftlab.config import ModelConfig, TrainConfig
from hftlab.data.format import Formatter
from hftlab.data.sources import get_source
from hftlab.defenses.base import Context
from hftlab.models.loading import add_lora, load_model, load_tokenizer
from hftlab.organism.build import ensure_organism
from hftlab.training.loop import accelerator

METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("sft", "sft", {}),
    ("vaccine", "vaccine", {}),
    ("booster", "booster", {}),
    ("booster+vaccine", "booster", {"perturb_aware": True}),
    ("booster, hb = batch", "booster", {"harmful_batch_size": 0}),
    ("repnoise", "repnoise", {}),
    ("t-vaccine", "t-vaccine", {}),
    ("t-vaccine -ckpt", "t-vaccine", {"checkpoint_frozen": False}),
    ("rsn-tune", "rsn-tune", {}),
]
TARGETS = {"vaccine": "≤ 1.8×", "booster": "≤ 3.1×", "repnoise": "≤ 2.2×", "t-vaccine": "mem < vaccine"}


def _trim_malloc() -> None:
    """Give freed heap memory back to the OS, so that each method's peak starts from a low base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Peak:
    """Peak memory (MiB) above the starting point, during the ``with`` block."""

    def __enter__(self) -> "Peak":
        gc.collect()
        _trim_malloc()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.resettable = _reset_peak()
            self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        elif self.resettable:
            peak = _status_kb("VmHWM") * 1024
        else:  # the peak cannot be reset: a rise over the whole process's history means nothing here
            self.mib = float("nan")
            return
        self.mib = max(0, peak - self.start) / 2 ** 20


def random_llama_1b(vocab: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` of the Llama-3.2-1B shape with the given vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=True, head_dim=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def _batches(fmt: Formatter, data: list, n: int, bs: int,
             device: torch.device = torch.device("cpu")) -> list[dict[str, torch.Tensor]]:
    feats = fmt.encode_all(data[: n * bs])
    return [{k: v.to(device) for k, v in fmt.collate(feats[i * bs: (i + 1) * bs]).items()} for i in range(n)]


def _clock() -> float:
    """CPU seconds of this process (robust to other processes on shared cores); wall time on CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class Runner:
    """One method training its own copy of the model with the loop's optimiser step."""

    def __init__(self, name: str, params: dict[str, Any], model: torch.nn.Module, ctx_data: dict,
                 fmt: Formatter, args: argparse.Namespace, steps: int):
        self.model = model
        if args.lora:
            torch.manual_seed(0)
            self.model = add_lora(self.model, TrainConfig(lora=True))
        self.model.train()
        defense = registry.get("defense", name)(**params)
        self.defense = defense if defense.acts_in("align") else registry.get("defense", "sft")()
        self.ctx = Context(stage="align", accelerator=accelerator(1), formatter=fmt, data=ctx_data,
                           batch_size=args.batch_size, total_steps=steps)
        torch.manual_seed(0)
        self.defense.setup(self.model, self.ctx)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self, b: dict[str, torch.Tensor]) -> None:
        self.defense.backward(self.model, b, self.ctx)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ctx.step += 1
        self.defense.on_step_end(self.model, self.ctx)

    def close(self) -> None:
        self.defense.teardown(self.model, self.ctx)


def step_times(base: torch.nn.Module, batches: list, ctx_data: dict, fmt: Formatter,
               args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step; the methods take turns on each batch (rotating order)."""
    runners = {label: Runner(name, params, copy.deepcopy(base), ctx_data, fmt, args, len(batches))
               for label, name, params in METHODS}
    times: dict[str, list[float]] = {label: [] for label in runners}
    labels = list(runners)
    for i, b in enumerate(batches):
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            start = _clock()
            runners[label].step(b)
            if i > 0:  # the first step is a warm-up (iterators, optimiser state)
                times[label].append(_clock() - start)
    for r in runners.values():
        r.close()
    return {label: statistics.median(t) for label, t in times.items()}


def peak_memory(base: torch.nn.Module, batches: list, ctx_data: dict, fmt: Formatter,
                args: argparse.Namespace) -> dict[str, float]:
    """Peak MiB above the start of each method's setup and first steps, one method at a time."""
    out = {}
    for label, name, params in METHODS:
        model = copy.deepcopy(base)
        with Peak() as peak:
            runner = Runner(name, params, model, ctx_data, fmt, args, len(batches))
            for b in batches[:3]:
                runner.step(b)
            runner.close()
        out[label] = peak.mib
        del runner, model
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed optimiser steps per method and round")
    ap.add_argument("--batch-size", type=int, default=32, help="alignment batch (the align stage's default)")
    ap.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", choices=("organism", "llama-1b"), default="organism",
                    help="the organism's weights, or a random Llama of the 1B shape (for a GPU)")
    ap.add_argument("--harmful-like-alignment", action="store_true",
                    help="diagnostic: harmful batches drawn from the alignment set (same lengths)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    path = ensure_organism()
    tok = load_tokenizer(path, ModelConfig())
    fmt = Formatter(tok, max_length=128)
    source = get_source("organism")
    base = load_model(path, ModelConfig())
    if args.shape == "llama-1b":
        dev = next(base.parameters()).device
        base = random_llama_1b(len(tok), torch.bfloat16 if dev.type == "cuda" else torch.float32, dev)
    alignment = source.alignment(args.batch_size * (args.steps + 1))
    batches = _batches(fmt, alignment, args.steps + 1, args.batch_size, next(base.parameters()).device)
    harmful = source.alignment(1000) if args.harmful_like_alignment else source.harmful("provider", 1000)
    ctx_data = {"alignment": alignment, "harmful": harmful}
    width = {}
    for k, v in ctx_data.items():
        sample = _batches(fmt, v, max(1, min(8, len(v) // args.batch_size)), args.batch_size)
        width[k] = sum(b["input_ids"].numel() for b in sample) / len(sample)

    seconds = step_times(base, batches, ctx_data, fmt, args)
    memory = peak_memory(base, batches, ctx_data, fmt, args)
    sft = seconds["sft"]
    device = "cuda (wall time)" if torch.cuda.is_available() else f"cpu, {args.threads} thread (process CPU time)"
    mode = "LoRA" if args.lora else "full fine-tuning"
    print(f"alignment step on the organism's data ({args.shape} weights), {mode}, batch {args.batch_size}, "
          f"median of {args.steps} interleaved steps, {device}")
    print(f"padded tokens per batch: alignment {width['alignment']:.0f}, harmful {width['harmful']:.0f}"
          f"{' (drawn from the alignment set)' if args.harmful_like_alignment else ''}")
    print(f"{'method':<16} {'s/step':>8} {'× SFT':>7} {'peak MiB':>9}  target")
    for label, _, _ in METHODS:
        print(f"{label:<16} {seconds[label]:>8.3f} {seconds[label] / sft:>6.2f}× {memory[label]:>9.1f}  "
              f"{TARGETS.get(label, '')}")


if __name__ == "__main__":
    main()
