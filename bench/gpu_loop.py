"""hftlab's training loop vs a plain PyTorch + PEFT loop, in the same run, on a GPU (or ``--tiny`` on CPU).

    python bench/gpu_loop.py            # GPU: Llama-3.2-1B shape, bf16, SDPA, LoRA r=32 on q,k,v, 16 × 512
    python bench/gpu_loop.py --tiny     # CPU smoke run of the same code (seconds)

Both loops train a randomly initialised ``LlamaForCausalLM`` of the Llama-3.2-1B shape (hidden 2048,
16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 128256, tied embeddings) wrapped in the same
PEFT LoRA (r=32, α=32, q/k/v), AdamW (lr 1e-4), gradient clipping at 1.0, on the same batches of random
token ids (16 sequences × 512 tokens, every token labelled). Each loop is timed from the end of its
warm-up steps to the end of its last step (CUDA synchronised at every step in both loops).

Printed per loop: tokens/s, and MFU = 6 · N · tokens/s / peak, where N counts ALL parameters (frozen
base + LoRA): the standard 6N approximation, which for LoRA overstates the work done (no weight
gradients for frozen matrices), so read MFU as "dense-equivalent". Peak bf16 dense FLOP/s: 989e12 for
H100/H200, 312e12 for A100 (``--peak`` overrides). Then the ratio hftlab / plain. Runs in about a minute
on an H100 (model built directly on the GPU; 5 warm-up + 20 timed steps per loop).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(name: str, override: float) -> float:
    if override:
        return override
    return next((v for k, v in PEAKS.items() if k in name), 0.0)


def build(args: argparse.Namespace, device: Any, dtype: Any) -> Any:
    """A fresh random-init Llama of the chosen shape with a LoRA on q, k, v (same seed every time)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True)
    else:
        cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                          intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0, tie_word_embeddings=True, head_dim=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    lora = LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def batches(args: argparse.Namespace, vocab: int, n: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(n)]


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(args: argparse.Namespace, device: Any, dtype: Any, data: list[Any]) -> list[float]:
    """The reference: model(**batch).loss, backward, clip, AdamW step; a timestamp after every step."""
    import torch

    model = build(args, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    stamps = []
    for ids in data:
        ids = ids.to(device)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        stamps.append(time.perf_counter())
    del model, opt
    return stamps


def hftlab_loop(args: argparse.Namespace, device: Any, dtype: Any, data: list[Any]) -> list[float]:
    """hftlab.training.loop.train on the same batches; timestamps from the defense's on_step_end hook."""
    from hftlab.config import TrainConfig
    from hftlab.defenses.base import Defense
    from hftlab.training.loop import train

    stamps: list[float] = []

    class Clock(Defense):
        def on_step_end(self, model: Any, ctx: Any) -> None:
            sync(device)
            stamps.append(time.perf_counter())

    feats = [{"input_ids": row.tolist(), "labels": row.tolist()} for ids in data for row in ids]
    model = build(args, device, dtype)
    cfg = TrainConfig(lr=1e-4, max_steps=len(data), batch_size=args.batch, lora=True, lora_r=32, lora_alpha=32,
                      max_grad_norm=1.0, max_length=args.seq)
    # the loop shuffles; every feature is a full-length random sequence, so any order is the same work
    train(model, feats, cfg, defense=Clock(), seed=0, desc="hftlab", pad_id=0)
    del model
    return stamps


def rate(stamps: list[float], warmup: int, tokens_per_step: int) -> float:
    timed = stamps[warmup:]
    return tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU (a smoke test of this script)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per loop (default 20; tiny 4)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps per loop (default 5; tiny 2)")
    ap.add_argument("--peak", type=float, default=0.0, help="peak bf16 dense FLOP/s of the card (auto for H100/H200/A100)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")) if args.tiny else torch.get_num_threads())
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    args.batch, args.seq = (4, 64) if args.tiny else (16, 512)
    args.steps = args.steps or (4 if args.tiny else 20)
    args.warmup = args.warmup or (2 if args.tiny else 5)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(name, args.peak)

    probe = build(args, torch.device("meta"), dtype)
    n_params = sum(p.numel() for p in probe.parameters())
    n_train = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    vocab = probe.config.vocab_size
    del probe
    data = batches(args, vocab, args.warmup + args.steps)
    tokens = args.batch * args.seq
    print(f"device: {name}  dtype: {dtype}  params: {n_params / 1e6:.2f} M (LoRA trainable {n_train / 1e6:.2f} M)")
    print(f"batch: {args.batch} x {args.seq} tokens  warm-up: {args.warmup}  timed steps: {args.steps}")

    results = {}
    for label, loop in (("plain PyTorch+PEFT", plain_loop), ("hftlab loop", hftlab_loop)):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        stamps = loop(args, device, dtype, data)
        gc.collect()
        tps = rate(stamps, args.warmup - 1, tokens)
        mfu = 6 * n_params * tps / peak if peak else math.nan
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan
        results[label] = tps
        print(f"{label:<20} {tps:12.0f} tokens/s   MFU {100 * mfu:5.1f}% (6N approx.)   peak mem {mem:.1f} GiB",
              flush=True)
    ratio = results["hftlab loop"] / results["plain PyTorch+PEFT"]
    print(f"ratio hftlab / plain: {ratio:.3f}  (1.0 = no overhead; peak used: {peak:.3g} FLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
