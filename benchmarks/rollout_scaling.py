"""Data-parallel rollout scaling: 1 / 2 / 4 engines as processes, each a `SimulatedEngine` that costs a fixed time
per decoded token (time.sleep, so the result measures the scheduling, not this machine's two cores).

Work: 64 prompts x 8 samples, lognormal response lengths (median 32 tokens, sigma 0.8, capped at 8x the median),
handed out one prompt group per request from the job's store queue (`rollout.dispatch.StoreQueue`), then gathered
on every rank as tensors (`rollout.exchange.gather_chunks`): the code path of the training loop. Prints, per engine
count, the median wall time over `--repeats`, the speed-up against 1 engine measured in the same run, and the
engines' load (busy seconds, max over mean).

    OMP_NUM_THREADS=1 python benchmarks/rollout_scaling.py [--seconds-per-token 5e-4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPTS, SAMPLES, MEDIAN, SIGMA = 64, 8, 32, 0.8


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    from rlad_megatron.data import PromptSample
    from rlad_megatron.rollout.base import SamplingParams
    from rlad_megatron.rollout.dispatch import StoreQueue, WorkPlan, flatten, run_engine
    from rlad_megatron.rollout.exchange import gather_chunks
    from rlad_megatron.rollout.generate import RewardSpec, make_scorer
    from rlad_megatron.rollout.simulated import SimulatedEngine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    store = dist.distributed_c10d._get_default_store()
    samples = [PromptSample(prompt=str(i), answer="", task="t", prompt_ids=[1, 2, 3]) for i in range(PROMPTS)]
    plan = WorkPlan(samples, SAMPLES, chunk_groups=1)
    engine = SimulatedEngine(seconds_per_token=args.seconds_per_token, median_tokens=MEDIAN, sigma=SIGMA)
    scorer = make_scorer(RewardSpec("tests.loop_rewards:length_parity"))

    class Tok:
        def decode(self, ids, skip_special_tokens=True) -> str:
            return " ".join(map(str, ids))

    sampling = SamplingParams(temperature=1.0, max_new_tokens=8 * MEDIAN, seed=args.seed)
    results = []
    for r in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        work = run_engine(engine, plan, StoreQueue(store, f"bench/{r}", plan.chunks), sampling=sampling,
                          tokenizer=Tok(), scorer=scorer)
        rollouts, _ = flatten(gather_chunks(work.results, plan), plan)
        wall = time.perf_counter() - t0
        busy = torch.tensor([work.busy_seconds, float(work.sequences)], dtype=torch.float64)
        parts = [torch.zeros_like(busy) for _ in range(world)]
        dist.all_gather(parts, busy)
        if rank == 0:
            loads = [float(p[0]) for p in parts]
            tokens = sum(len(x.output_ids) for x in rollouts)
            results.append((wall, max(loads) / statistics.fmean(loads), tokens, statistics.fmean(loads)))
    if rank == 0:
        out[world] = results
    dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> list[tuple[float, float, int, float]]:
    """`args.repeats` x (wall seconds, engine load max/mean, generated tokens, mean busy seconds) with `world`
    engine processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
        return list(out[world])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seconds-per-token", type=float, default=5e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = {e: measure(e, args) for e in args.engines}
    base = statistics.median(r[0] for r in rows[args.engines[0]])
    tokens = rows[args.engines[0]][0][2]
    print(f"{PROMPTS} prompts x {SAMPLES} samples, {tokens} generated tokens, {args.seconds_per_token * 1e3:g} ms per "
          f"token (sequential engine): {tokens * args.seconds_per_token:.2f} s of generation in all")
    print("| engines | wall s (median) | speed-up vs 1 | engine busy s (mean) | engine load max/mean (worst repeat) |")
    print("|---:|---:|---:|---:|---:|")
    for e in args.engines:
        wall = statistics.median(r[0] for r in rows[e])
        busy = statistics.median(r[3] for r in rows[e])
        print(f"| {e} | {wall:.3f} | {base / wall:.2f} | {busy:.3f} | {max(r[1] for r in rows[e]):.3f} |")


if __name__ == "__main__":
    main()
