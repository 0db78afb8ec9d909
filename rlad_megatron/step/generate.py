"""One generation call of the job, on every engine at once: the prompts are cut into chunks of whole prompt groups,
every engine takes chunks from a queue shared through the job's store until none is left and scores each sample as
it finishes, then every rank gets every chunk as tensors (`rollout.exchange`). Ranks without an engine (or whose
engine is done) wait at a store barrier bounded by `--distributed-timeout-minutes`, not inside a collective.

Used by the training rollouts, the held-out evaluation and the teacher's SFT traces.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.rollout.base import Rollout, SamplingParams
from rlad_megatron.rollout.dispatch import EngineWork, LocalQueue, Scorer, StoreQueue, WorkPlan, flatten, run_engine
from rlad_megatron.rollout.exchange import gather_chunks
from rlad_megatron.step.run import Run

# every rank makes the same generation calls in the same order: the n-th call's chunk queue and barrier keys in the
# job's store are the same on every rank, and fresh for each call (also across runs in one process)
_CALLS = itertools.count(1)
AUTO_CHUNKS_PER_ENGINE = 2  # --rollout-chunk-groups 0: requests per engine and call (balance vs batching)


def generate_everywhere(run: Run, samples: Sequence, n: int, sampling: SamplingParams, scorer: Scorer,
                        what: str) -> tuple[list[Rollout], list[float], dict]:
    """`n` samples per prompt from every engine: (rollouts and rewards in `prompt x n` order, identical on every
    rank; `perf/` metrics of the engines' load)."""
    plan = WorkPlan(samples, n, chunk_groups=chunk_groups(run.rollout.chunk_groups, len(samples), run.layout.engines))
    key = f"rlad/generation/{next(_CALLS)}"
    start = time.monotonic()
    deadline = start + 60.0 * platform.timeout_minutes()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    queue = StoreQueue(dist.distributed_c10d._get_default_store(), key, plan.chunks) if distributed else \
        LocalQueue(plan.chunks)
    work = EngineWork([])
    if run.engine is not None:
        work = run_engine(run.engine, plan, queue, sampling=sampling, tokenizer=run.tokenizer, scorer=scorer,
                          concurrency=getattr(run.engine, "concurrency", 1), deadline=deadline)
    platform.wait_for_all(f"{key}/done", since=start, what=what)
    rollouts, rewards = flatten(gather_chunks(work.results, plan), plan)
    return rollouts, rewards, engine_load(run, work, time.monotonic() - start, scorer.pop_timeouts())


def chunk_groups(flag: int, prompts: int, engines: int) -> int:
    """Prompt groups per engine request: `--rollout-chunk-groups`, or for 0 (auto)
    `ceil(prompts / (engines x AUTO_CHUNKS_PER_ENGINE))`, so an in-process engine batches a call's prompts in a few
    requests (a 512-prompt greedy eval is 2 requests of 256 on one engine, not 512 of 1) while engines that free up
    early still take work from slower ones. The samples do not depend on it: each sequence's seed is its index in
    the call (`rollout.dispatch`)."""
    return flag if flag > 0 else max(1, -(-prompts // (engines * AUTO_CHUNKS_PER_ENGINE)))


def engine_load(run: Run, work: EngineWork, seconds: float, timeouts: int) -> dict:
    """How evenly the engines shared the call (busy seconds and sequences, max over mean across engines) and the
    reward timeouts of every rank (each scored 0)."""
    mine = torch.tensor([work.busy_seconds, float(work.sequences), float(run.engine is not None), float(timeouts)],
                        dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
    else:
        parts = [mine]
    engines = [p for p in parts if p[2] > 0]
    busy = [float(p[0]) for p in engines]
    seqs = [float(p[1]) for p in engines]
    mean_busy = sum(busy) / max(len(busy), 1)
    return {"perf/rollout_engines": float(len(engines)), "perf/generate_s": seconds,
            "rollout/reward_timeouts": sum(float(p[3]) for p in parts),
            "perf/engine_busy_max_over_mean": max(busy) / mean_busy if mean_busy > 0 else 1.0,
            "perf/engine_sequences_max_over_mean": max(seqs) / (sum(seqs) / len(seqs)) if sum(seqs) else 1.0}
