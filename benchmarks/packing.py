"""Packed vs padded micro-batches in the update, on the tiny CPU student (d=32, 2 layers, char vocab).

256 sequences with lognormal lengths (median 24 tokens, sigma 0.8, capped at 8x the median), responses after a
6-token prompt, one GRPO update (`step.update.accumulate_gradients`, the loop's code path) per repetition:

* padded: the batch right-padded to its longest sequence, `--micro-batch-size` rows per micro-batch;
* packed: `--use-dynamic-batch-size`, packs of whole sequences of at most `--max-tokens-per-gpu` tokens.

Prints processed tokens / real tokens for both, and the median update time packed / padded (measured in the same
run, alternating).

    OMP_NUM_THREADS=1 python benchmarks/packing.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch

SEQS, MEDIAN, SIGMA, PROMPT = 256, 24, 0.8, 6


def lengths(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(PROMPT + 1, min(8 * MEDIAN, round(MEDIAN * math.exp(SIGMA * rng.gauss(0.0, 1.0)))))
            for _ in range(SEQS)]


def make_batch(lens: list[int], vocab: int):
    from rlad_megatron.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    width = max(lens)
    tokens = torch.randint(3, vocab, (SEQS, width), generator=g)
    mask = torch.zeros(SEQS, width - 1)
    for i, n in enumerate(lens):
        tokens[i, n:] = 0
        mask[i, PROMPT - 1:n - 1] = 1.0
    adv = torch.randn(SEQS, generator=g)
    old = -torch.rand(SEQS, width - 1, generator=g) - 3.0
    return RolloutBatch(tokens=tokens, response_mask=mask, rollout_logp=old, rewards=adv, advantages=adv, old_logp=old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--max-tokens-per-gpu", type=int, default=256,
                   help="the pack budget; the local attention path costs T^2 per pack, so packs just above the "
                        "longest sequence are fastest on CPU (THD attention on GPU costs per sequence)")
    a = p.parse_args()
    from transformers import AutoConfig

    from rlad_megatron import platform
    from rlad_megatron.models.builder import build_model
    from rlad_megatron.models.families import spec_from_hf_config
    from rlad_megatron.models.packed import packed_micro_batches
    from rlad_megatron.optim import build_optimizer
    from rlad_megatron.step.algos import LossConfig, LossContext
    from rlad_megatron.step.update import Policy, UpdateConfig, accumulate_gradients
    from rlad_megatron.tiny import tiny_config

    platform.init(platform.Layout(), seed=1)
    cfg = tiny_config("student")
    spec = spec_from_hf_config(AutoConfig.for_model(**cfg.to_dict()).to_dict())
    model = build_model(spec, masked_softmax_fusion=False)
    ddp, opt, sched = build_optimizer(model, lr=1e-4, clip_grad=0.0)
    policy = Policy(model, ddp, opt, sched)
    lens = lengths(3)
    batch = make_batch(lens, spec.vocab_size)
    real = sum(lens)
    padded_tokens = SEQS * max(lens)
    packs = packed_micro_batches(model, batch.sequences(), max_tokens_per_gpu=a.max_tokens_per_gpu)
    packed_tokens = sum(int(p.tokens.numel()) for p in packs)
    loss = LossConfig(algo="grpo")
    ctx = LossContext(tp_group=model.pg.tp, vocab_size=spec.vocab_size)
    configs = {"padded": UpdateConfig(micro_batch_size=a.micro_batch_size),
               "packed": UpdateConfig(max_tokens_per_gpu=a.max_tokens_per_gpu)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(a.repeats + 1):
        for name, c in configs.items():
            t0 = time.perf_counter()
            accumulate_gradients(policy, batch, c, loss, ctx, where="benchmark")
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    pad_s, pack_s = statistics.median(times["padded"]), statistics.median(times["packed"])
    print(f"{SEQS} sequences, lengths lognormal(median {MEDIAN}, sigma {SIGMA}) capped at {8 * MEDIAN}: "
          f"{real} real tokens, longest {max(lens)}; packs of <= {a.max_tokens_per_gpu} tokens: {len(packs)}; "
          f"padded micro-batches of {a.micro_batch_size} rows: {SEQS // a.micro_batch_size}")
    print("| layout | processed tokens | processed / real | update s (median) | time / padded |")
    print("|---|---:|---:|---:|---:|")
    print(f"| padded | {padded_tokens} | {padded_tokens / real:.2f} | {pad_s:.3f} | 1.00 |")
    print(f"| packed | {packed_tokens} | {packed_tokens / real:.2f} | {pack_s:.3f} | {pack_s / pad_s:.2f} |")
    platform.shutdown()


if __name__ == "__main__":
    main()
