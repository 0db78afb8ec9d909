"""Peak memory and time of the fused output-layer log-prob vs the logits path (CPU, gloo, torchrun, TP=2).

Every rank holds the final hidden states ``x [tokens, h]`` (the same on all ranks) and its output-layer shard
``W [vocab/tp, h]`` (bf16 by default; Qwen vocab 151,936, hidden 1536). Three implementations of
``log softmax(x W^T)[target]``, forward + backward of ``sum(logp)`` (+ ``sum(entropy)`` in mode ``logp+ent+bwd``),
gradients w.r.t. ``x`` (all-reduced over TP, as ColumnParallelLinear's backward does) and ``W``:

* ``fused``: ``rlad_megatron.ops.output_logprobs`` (tiles of ``--token-chunk`` x ``--vocab-chunk``, no logits;
  differentiable log-probs for any loss, so its backward recomputes the logits: 4 GEMMs).
* ``fused-loss``: ``rlad_megatron.ops.output_loss`` with the same loss, differentiated in the forward pass (what the
  update runs: chunks of ``--loss-token-chunk`` tokens x the whole vocab shard, 3 GEMMs); modes with a backward.
* ``logits+vp``: the output layer's ``[tokens, vocab/tp]`` bf16 logits, then
  ``rlad_megatron.ops.logprobs.vocab_parallel_logprobs``.
* ``logits+mcore``: the same logits, then megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy``
  (log-prob only; it has no entropy).

GEMMs: on this CPU torch's bf16 GEMM runs at 2-5 GFLOP/s against 20-24 for fp32, so the bf16 output layer of the
baselines is a custom linear that, like the fused op, runs its GEMMs in fp32 on upcast vocab blocks of
``--vocab-chunk`` rows and stores bf16 logits / gradients: the same GEMM work and precision for all three, and a
baseline memory profile of a bf16 linear (logits, their gradient) plus one fp32 block. On a GPU all three would
use bf16 tensor cores.

Memory: the RSS high-water mark minus the RSS before the op (``/proc/self/clear_refs`` reset; MiB, max over ranks;
every byte the process touches). Time: wall clock per repeat (barrier before), max over ranks, median; and the
rank's CPU time (``time.process_time``, one thread per rank), which other jobs on a shared machine disturb far
less than the wall clock.

Usage: ``OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fused_logprob.py [--tokens 8192] [--modes logp+bwd]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _ranks import run_ranks

MODES = ("logp+bwd", "logp+ent+bwd", "logp")
IMPLS = ("logits+vp", "logits+mcore", "fused", "fused-loss")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _output_layer(block: int):
    """A bf16 ColumnParallelLinear (no bias, input gradient all-reduced over TP) whose GEMMs run in fp32 on
    upcast vocab blocks: `[tokens, h] x [vocab/tp, h] -> [tokens, vocab/tp]` logits in the weight dtype."""
    import torch
    import torch.distributed as dist

    class Linear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            out = torch.empty(x.shape[0], w.shape[0], dtype=w.dtype)
            x32 = x.float()
            for v0 in range(0, w.shape[0], block):
                out[:, v0:v0 + block] = x32 @ w[v0:v0 + block].float().t()
            return out

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            x32 = x.float()
            dx = torch.zeros(x.shape, dtype=torch.float32)
            dw = torch.empty_like(w)
            for v0 in range(0, w.shape[0], block):
                gb = g[:, v0:v0 + block].float()
                dx.addmm_(gb, w[v0:v0 + block].float())
                dw[v0:v0 + block] = gb.t() @ x32
            dist.all_reduce(dx)
            return dx.to(x.dtype), dw

    return Linear.apply


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration; writes ``rank{r}.json`` (peak-memory delta, times) to ``--out-dir``."""
    import torch
    import torch.distributed as dist

    from rlad_megatron import platform

    platform.init(platform.Layout(tp=int(os.environ["WORLD_SIZE"])))
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.ops.output_logprobs import output_logprobs
    from rlad_megatron.ops.output_loss import output_loss

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    local = args.vocab // world
    grad = args.mode.endswith("+bwd")
    with_entropy = "ent" in args.mode
    linear = _output_layer(args.vocab_chunk)

    def run(x, w, targets):
        with torch.set_grad_enabled(grad):
            if args.impl == "fused-loss":
                loss, lp, _, _ = output_loss(x, w, targets, lambda lp, ent: (lp.sum() + (ent.sum() if ent is not None
                                                                                          else 0.0), None),
                                             group=dist.group.WORLD, with_entropy=with_entropy,
                                             token_chunk=args.loss_token_chunk or None, vocab_chunk=args.vocab_chunk)
                loss.backward()
                return lp
            if args.impl == "fused":
                lp, ent = output_logprobs(x, w, targets, group=dist.group.WORLD, with_entropy=with_entropy,
                                          token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk)
            else:
                logits = linear(x, w)
                if args.impl == "logits+vp":
                    lp, ent = vocab_parallel_logprobs(logits, targets, group=dist.group.WORLD,
                                                      with_entropy=with_entropy)
                else:  # megatron-core: [s, b, v/tp] logits, returns the per-token loss (-log p)
                    lp, ent = -vocab_parallel_cross_entropy(logits[:, None], targets[:, None])[:, 0], None
                del logits
            if grad:
                (lp.sum() + (ent.sum() if ent is not None else 0.0)).backward()
        return lp

    gen = torch.Generator().manual_seed(0)  # same hidden states on every rank, each rank its own shard
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(dtype).requires_grad_(grad)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    torch.manual_seed(1234 + rank)
    w = (0.02 * torch.randn(local, args.hidden)).to(dtype).requires_grad_(grad)
    run(x[:8].detach().requires_grad_(grad), w, targets[:8])  # warm-up: kernels, gloo buffers
    w.grad = None
    peaks, times, cpu = [], [], []
    for _ in range(args.repeats):
        x.grad = w.grad = None
        dist.barrier()
        rss0 = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
        t0, c0 = time.perf_counter(), time.process_time()
        out = run(x, w, targets)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peaks.append((_status_kib("VmHWM") - rss0) / 1024)
        del out
    result = {"rank": rank, "peak_mib": max(peaks), "times": times, "cpu": cpu}
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    platform.shutdown()


def launch(impl: str, mode: str, args: argparse.Namespace) -> dict:
    ranks = run_ranks(__file__, ["--impl", impl, "--mode", mode, "--tokens", str(args.tokens), "--hidden",
                                 str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats",
                                 str(args.repeats), "--token-chunk", str(args.token_chunk), "--vocab-chunk",
                                 str(args.vocab_chunk), "--loss-token-chunk", str(args.loss_token_chunk)], nproc=args.tp, label=f"{impl}/{mode}", timeout=14400)
    wall = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
    cpu = [max(r["cpu"][i] for r in ranks) for i in range(args.repeats)]
    return {"peak_mib": max(r["peak_mib"] for r in ranks), "time_s": statistics.median(wall),
            "cpu_s": statistics.median(cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="fused", choices=IMPLS)
    ap.add_argument("--mode", default="logp+bwd", choices=MODES)
    ap.add_argument("--modes", default="logp+bwd", help=f"comma-separated, of {','.join(MODES)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated; the first is the baseline")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--token-chunk", type=int, default=4096)
    ap.add_argument("--vocab-chunk", type=int, default=4096)
    ap.add_argument("--loss-token-chunk", type=int, default=0,
                    help="fused-loss: tokens per chunk (x vocab/tp); 0: the op's default (64 MiB of fp32 logits)")
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} tp={args.tp} dtype={args.dtype} "
          f"repeats={args.repeats} tiles={args.token_chunk}x{args.vocab_chunk}; peak = RSS high-water delta per rank "
          f"(MiB, max over ranks); wall / cpu = median seconds (max over ranks)")
    print("| mode | impl | peak MiB | peak / base | wall s | wall / base | cpu s | cpu / base |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes.split(","):
        impls = [i for i in args.impls.split(",")
                 if not ("ent" in mode and i == "logits+mcore")  # mcore: no entropy
                 and not (not mode.endswith("+bwd") and i == "fused-loss")]  # a loss with its gradient
        base = None
        for impl in impls:
            r = launch(impl, mode, args)
            base = base or r
            print(f"| {mode} | {impl} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.3f} | "
                  f"{r['time_s']:.1f} | {r['time_s'] / base['time_s']:.2f} | {r['cpu_s']:.1f} | "
                  f"{r['cpu_s'] / base['cpu_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
