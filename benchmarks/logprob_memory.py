"""Peak memory and time of vocab-parallel log-probs vs the gather-the-vocabulary baseline (CPU, gloo, torchrun).

Each configuration runs in a fresh ``torchrun --nproc_per_node=TP`` job. On every rank the input is this rank's
``[tokens, vocab/tp]`` logits shard (bf16 by default, Qwen vocab 151,936). Two implementations:

* ``vp``: ``rlad_megatron.ops.logprobs.vocab_parallel_logprobs`` (only per-token scalars all-reduced, chunked).
* ``gather``: all-gather the shards into ``[tokens, vocab]``, upcast, ``log_softmax``, gather the target,
  entropy ``-(p log p).sum``; backward by autograd on the full tensor, the local gradient is its slice (the
  semantics of Megatron's ``gather_from_tensor_model_parallel_region``, whose backward is a split).

Modes: ``logp`` (no grad: old-policy / teacher scoring), ``logp+ent`` (no grad), ``logp+ent+bwd`` (forward with
grad, then backward of ``sum(logp) + sum(H)``; the gradient w.r.t. the shard is materialised).

Memory: the kernel's resident-set high-water mark. After the inputs exist and a small warm-up ran, each rank
resets it (``echo 5 > /proc/self/clear_refs``) and, after every repeat, reads ``VmHWM`` from
``/proc/self/status``; reported is ``VmHWM - VmRSS`` before the op (MiB, max over ranks and repeats). This
counts every byte the process touches (torch tensors, gloo buffers, allocator slack), not just tensors.
Time: wall clock of the op per repeat (barrier before), max over ranks, median over repeats.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/logprob_memory.py [--tokens 2048] [--chunks 512,1024,4096]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _ranks import run_ranks

MODES = ("logp", "logp+ent", "logp+ent+bwd")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _gather_impl(x, targets, group, with_entropy: bool, grad: bool):
    """Baseline: full-vocab logits on every rank, then a plain fp32 log_softmax."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    full = torch.cat(parts, dim=-1)
    del parts
    full.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        logp_all = torch.log_softmax(full.float(), dim=-1)  # [tokens, vocab]
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    if grad:
        (logp.sum() + ent.sum()).backward()
        v = x.shape[-1]
        x.grad = full.grad[:, rank * v:(rank + 1) * v].clone()
    return logp, ent


def _vp_impl(x, targets, group, with_entropy: bool, grad: bool, chunk: int):
    import torch

    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs

    with torch.set_grad_enabled(grad):
        logp, ent = vocab_parallel_logprobs(x, targets, group=group, chunk_size=chunk, with_entropy=with_entropy)
    if grad:
        (logp.sum() + ent.sum()).backward()
    return logp, ent


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration; writes ``rank{r}.json`` (peak-memory delta, times) to ``--out-dir``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    local = args.vocab // world
    with_entropy, grad = args.mode != "logp", args.mode == "logp+ent+bwd"

    def run(x, targets):
        if args.impl == "gather":
            return _gather_impl(x, targets, dist.group.WORLD, with_entropy, grad)
        return _vp_impl(x, targets, dist.group.WORLD, with_entropy, grad, args.chunk)

    torch.manual_seed(1234 + rank)  # each rank its own shard; no [tokens, vocab] tensor is ever built here
    warm = torch.empty(8, local, dtype=dtype).normal_(0, 3).requires_grad_(grad)
    run(warm, torch.randint(0, args.vocab, (8,), generator=torch.Generator().manual_seed(0)))
    del warm
    x = torch.empty(args.tokens, local, dtype=dtype).normal_(0, 3).requires_grad_(grad)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(0))
    peaks, times = [], []
    for _ in range(args.repeats):
        x.grad = None
        dist.barrier()
        rss0 = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark to the current RSS
        t0 = time.perf_counter()
        out = run(x, targets)
        times.append(time.perf_counter() - t0)
        peaks.append((_status_kib("VmHWM") - rss0) / 1024)
        del out
    result = {"rank": rank, "peak_mib": max(peaks), "times": times}
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(impl: str, mode: str, chunk: int, args: argparse.Namespace) -> dict:
    ranks = run_ranks(__file__, ["--impl", impl, "--mode", mode, "--chunk", str(chunk), "--tokens", str(args.tokens),
                                 "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats)],
                      nproc=args.tp, label=f"{impl}/{mode}", timeout=1800)
    per_repeat = [max(r["times"][i] for r in ranks) for i in range(args.repeats)]
    return {"peak_mib": max(r["peak_mib"] for r in ranks), "time_s": statistics.median(per_repeat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="vp", choices=["vp", "gather"])
    ap.add_argument("--mode", default="logp+ent+bwd", choices=MODES)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--chunks", default="256,1024,4096", help="chunk sizes of the vp rows")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"tokens={args.tokens} vocab={args.vocab} tp={args.tp} dtype={args.dtype} repeats={args.repeats}; "
          f"peak = RSS high-water delta per rank (MiB, max over ranks); time = median wall s (max over ranks)")
    header = "| mode | impl | peak MiB | peak / gather | time s | time / gather |"
    print(header + "\n|---|---|---:|---:|---:|---:|")
    for mode in args.modes.split(","):
        base = launch("gather", mode, 0, args)
        rows = [("gather (all-gather + log_softmax)", base)]
        rows += [(f"vocab-parallel, chunk {c}", launch("vp", mode, c, args)) for c in chunks]
        for name, r in rows:
            print(f"| {mode} | {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.3f} | "
                  f"{r['time_s']:.2f} | {r['time_s'] / base['time_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
