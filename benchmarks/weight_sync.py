"""Bucketed weight sync (`push_weights` into an HFEngine) vs a raw `param.copy_(src)` of the same tensors.

Usage: OMP_NUM_THREADS=1 python benchmarks/weight_sync.py [--buckets-mib 16 64 256 512] [--repeats 5]

Source: a random fp32 Qwen2 of ~64M params (the trainer's fp32 master copy, already gathered to full HF tensors).
Engines: fp32 and bf16 HFEngines. Columns: raw = one `copy_` per parameter (cast fused into the copy), sync =
`push_weights` (bucket, validate, copy with the cast fused, session checks), flat = sync with every bucket first
packed (cast fused) into one reused `FlattenedBucket` staging buffer, as an SGLang-style backend ships it, and
loaded from its views. Best of N wall-clock, interleaved.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
from transformers import Qwen2Config

from rlad_megatron.rollout.hf_engine import HFEngine
from rlad_megatron.rollout.weight_sync import FlattenedBucket, push_weights


class FlatteningEngine:
    """Packs each bucket (cast fused) into one reused flat staging buffer and loads it from the buffer's views:
    the work an SGLang-style backend does to ship one flat tensor per bucket."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.staging = torch.empty(0, dtype=torch.uint8)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def update_weights(self, named_tensors) -> None:
        named = list(named_tensors)
        _, need = FlattenedBucket.layout(named, self.engine.weight_dtype)
        if self.staging.numel() < need:
            self.staging = torch.empty(need, dtype=torch.uint8)
        bucket = FlattenedBucket.from_named_tensors(named, dtype=self.engine.weight_dtype, out=self.staging)
        self.engine.update_weights(bucket.to_named_tensors())


def bench_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-`repeats` wall-clock per function, runs interleaved so load changes hit all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buckets-mib", type=int, nargs="+", default=[16, 64, 256, 512])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = bench_config()
    src = HFEngine(cfg, seed=1).model  # random fp32 weights
    named = list(src.named_parameters())
    n_params = sum(p.numel() for _, p in named)
    print(f"model: Qwen2 {n_params / 1e6:.1f}M params, {len(named)} tensors, fp32 source; "
          f"threads={args.threads}, best of {args.repeats}")
    print("| engine dtype | bucket MiB | buckets | GiB sent | raw copy s | sync s | sync/raw | flat s | flat/raw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        engine = HFEngine(cfg, dtype=dtype, seed=2)
        flattening = FlatteningEngine(engine)
        params = dict(engine.model.named_parameters())

        @torch.no_grad()
        def raw_copy(params=params) -> None:
            for name, t in named:
                params[name].copy_(t)

        for mib in args.buckets_mib:
            size = mib * 2**20
            stats = push_weights(engine, named, version="warmup", bucket_bytes=size)
            best = best_times({
                "raw": raw_copy,
                "sync": partial(push_weights, engine, named, version="v", bucket_bytes=size),
                "flat": partial(push_weights, flattening, named, version="v", bucket_bytes=size),
            }, args.repeats)
            raw = best["raw"]
            print(f"| {str(dtype).removeprefix('torch.')} | {mib} | {stats.buckets} | {stats.bytes / 2**30:.3f} "
                  f"| {raw:.3f} | {best['sync']:.3f} | {best['sync'] / raw:.2f} | {best['flat']:.3f} "
                  f"| {best['flat'] / raw:.2f} |")
        for name, t in named:  # the sync really loaded the source weights
            assert torch.equal(params[name], t.to(dtype)), name


if __name__ == "__main__":
    main()
