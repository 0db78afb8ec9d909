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


def generate_everywhere(run: Run, samples: Sequence, n: int, sampling: SamplingParams, scorer: Scorer,
                        what: str) -> tuple[list[Rollout], list[float], dict]:
    """`n` samples per prompt from every engine: (rollouts and rewards in `prompt x n` order, identical on every
    rank; `perf/` metrics of the engines' load)."""
    plan = WorkPlan(samples, n, chunk_groups=chunk_groups(run.rollout.chunk_groups, len(samples), run.layout.engines,
                                                          run.rollout.engine_batches_in_flight))
    key = f"rlad/generation/{next(_CALLS)}"
    start = time.monotonic()
    deadline = start + 60.0 * platform.timeout_minutes()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    queue = StoreQueue(dist.distributed_c10d._get_default_store(), key, plan.chunks) if distributed else \
        LocalQueue(plan.chunks)
    work = EngineWork([])
    if run.engine is not None:
        with platform.native_torch():
            work = run_engine(run.engine, plan, queue, sampling=sampling, tokenizer=run.tokenizer, scorer=scorer,
                              concurrency=getattr(run.engine, "concurrency", 1), deadline=deadline)
    platform.wait_for_all(f"{key}/done", since=start, what=what)
    rollouts, rewards = flatten(gather_chunks(work.results, plan), plan)
    return rollouts, rewards, engine_load(run, work, time.monotonic() - start, scorer.pop_timeouts())


def chunk_groups(flag: int, prompts: int, engines: int, batches_in_flight: bool) -> int:
    """Prompt groups per engine request: `--rollout-chunk-groups`, or for 0 (auto):
    - an engine that batches the requests it has in flight (SGLang: continuous batching, up to
      `--rollout-max-inflight` requests) gets one group per request, so engines that free up take the next group
      and a long-tailed group holds nothing else back;
    - a static-batch engine (the in-process HF engine: one request at a time, its time the longest sequence's
      decode steps x the per-step cost) gets one request per engine and call, `ceil(prompts / engines)` groups:
      cutting a call in more requests only adds decode steps (the tiny CPU example: 0.82 s per step's rollout in
      2 requests per engine, 0.44 s in 1).
    The samples do not depend on it: each sequence's seed is its index in the call (`rollout.dispatch`)."""
    if flag > 0:
        return flag
    return 1 if batches_in_flight else max(1, -(-prompts // engines))


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
