"""Generation with data-parallel engines: prompt groups are handed out in chunks to whichever engine is free, and
every sample is scored as soon as its chunk finishes, overlapping the rest of the generation.

The unit of work is a chunk: `chunk_groups` consecutive prompt groups (all `n` samples of each prompt) of the
prompt list. Sequence `j` of chunk `c` samples with seed `sampling.seed + c * chunk_groups * n + j`, i.e. the seed
plus its index in the flat `prompt x n` list, so the result depends neither on which engine ran a chunk nor on how
many engines there are (they hold the same weights, and an engine's numerics depend only on the chunk it is given).

Queues hand out chunk indices: `StoreQueue` through the job's TCP store (an atomic counter shared by every rank:
an engine takes the next chunk when it is free, so a slow engine or a long-tailed chunk does not hold the others
back), `LocalQueue` inside one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Protocol

from rlad_megatron.rollout.base import Rollout, RolloutEngine, SamplingParams


class WorkQueue(Protocol):
    def take(self) -> int | None:
        """The next chunk index to generate, or None when every chunk has been taken."""
        ...


class LocalQueue:
    """Chunks 0..n-1 for the threads of one process."""

    def __init__(self, n: int) -> None:
        self._next, self._n, self._lock = 0, n, threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self._n:
                return None
            self._next += 1
            return self._next - 1


class StoreQueue:
    """Chunks 0..n-1 shared by every process of a job through a `torch.distributed.Store` counter under `key`
    (a fresh key per generation call)."""

    def __init__(self, store, key: str, n: int) -> None:
        self._store, self._key, self._n = store, key, n

    def take(self) -> int | None:
        i = self._store.add(self._key, 1) - 1
        return i if i < self._n else None


class Scorer(Protocol):
    def submit(self, response: str, sample) -> Future:
        """A future of the reward of `response` for `sample`."""
        ...

    def pop_timeouts(self) -> int:
        """Samples scored 0 for taking too long since the previous call."""
        ...


@dataclass(frozen=True)
class WorkPlan:
    """The prompts of one generation call, `n` samples each, in chunks of `chunk_groups` prompts."""

    samples: Sequence  # PromptSample
    n: int
    chunk_groups: int = 1

    def __post_init__(self) -> None:
        if self.n < 1 or self.chunk_groups < 1:
            raise ValueError(f"n ({self.n}) and chunk_groups ({self.chunk_groups}) must be >= 1")

    @property
    def chunks(self) -> int:
        return -(-len(self.samples) // self.chunk_groups)

    def chunk_samples(self, c: int) -> Sequence:
        return self.samples[c * self.chunk_groups:(c + 1) * self.chunk_groups]

    def first_sequence(self, c: int) -> int:
        return c * self.chunk_groups * self.n


@dataclass
class ChunkResult:
    """One generated chunk: `len(chunk_samples) * n` rollouts in `prompt x n` order and their rewards."""

    index: int
    rollouts: list[Rollout]
    rewards: list[float]


@dataclass
class EngineWork:
    """What one engine did in a generation call: its chunks, and how long it was busy generating."""

    results: list[ChunkResult]
    busy_seconds: float = 0.0
    sequences: int = 0


def run_engine(engine: RolloutEngine, plan: WorkPlan, queue: WorkQueue, *, sampling: SamplingParams, tokenizer,
               scorer: Scorer, concurrency: int = 1, deadline: float | None = None) -> EngineWork:
    """Generate chunks taken from `queue` until it is empty (or `deadline`, a `time.monotonic()` stamp, passes),
    `concurrency` requests in flight; every sample of a finished chunk is submitted to `scorer` at once. Returns
    after every reward is in."""
    pending: list[tuple[int, list[Rollout], list[Future]]] = []
    busy, errors, lock = [0.0], [], threading.Lock()

    def worker() -> None:
        while not errors and (deadline is None or time.monotonic() < deadline):
            c = queue.take()
            if c is None:
                return
            samples = plan.chunk_samples(c)
            prompts = [s.prompt_ids for s in samples for _ in range(plan.n)]
            sp = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + plan.first_sequence(c))
            t0 = time.perf_counter()
            try:
                rollouts = engine.generate(prompts, sp)
                for r in rollouts:  # engines without a tokenizer return token ids only
                    r.text = r.text or tokenizer.decode(r.output_ids, skip_special_tokens=True)
                futures = [scorer.submit(r.text, s) for r, s in zip(rollouts, (s for s in samples for _ in range(plan.n)),
                                                                    strict=True)]
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                with lock:
                    errors.append(e)
                return
            with lock:
                busy[0] += time.perf_counter() - t0
                pending.append((c, rollouts, futures))

    threads = [threading.Thread(target=worker, name=f"rollout-{i}", daemon=True) for i in range(max(concurrency, 1))]
    if len(threads) == 1:
        worker()
    else:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    results = [ChunkResult(c, rollouts, [float(f.result()) for f in futures]) for c, rollouts, futures in pending]
    return EngineWork(sorted(results, key=lambda r: r.index), busy[0], sum(len(r.rollouts) for r in results))


def flatten(results: Sequence[ChunkResult], plan: WorkPlan) -> tuple[list[Rollout], list[float]]:
    """Every chunk's rollouts and rewards in the `prompt x n` order of the plan; every chunk must be there."""
    by_index = {r.index: r for r in results}
    missing = [c for c in range(plan.chunks) if c not in by_index]
    if missing:
        raise RuntimeError(f"rollout chunks {missing[:10]} of {plan.chunks} were never generated")
    rollouts = [x for c in range(plan.chunks) for x in by_index[c].rollouts]
    rewards = [x for c in range(plan.chunks) for x in by_index[c].rewards]
    return rollouts, rewards
