"""`RewardScorer`: per-sample reward futures with a deadline, so scoring can overlap generation.

    scorer = RewardScorer("countdown", workers=4, timeout=5.0)
    fut = scorer.submit(response, sample)          # as soon as one sample has finished generating
    ...
    rewards = [f.result() for f in futures]        # or scorer.score_batch(responses, samples)
    metrics["reward/timeouts"] = scorer.pop_timeouts()

`workers > 0`: worker processes (`pool.RewardPool`, shared by every scorer with that worker count); a sample
still being scored `timeout` seconds after it started gets 0.0 and its worker is killed and replaced.
`workers == 0` with a timeout: one background thread in this process (`lane.ThreadLane`), ordered; a sample past
its deadline gets 0.0 but the thread cannot be killed and keeps running (see `lane`). `workers == 0` without a
timeout (`timeout=0`/None): scored in the calling thread at `submit`, as before (math-verify's signal timeouts
then apply on the main thread). Every timeout scores 0.0 and is counted in `timeouts`.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from rlad_megatron.data.prompts import PromptSample
from rlad_megatron.rewards.lane import ThreadLane
from rlad_megatron.rewards.pool import Job, RewardPool, settle
from rlad_megatron.rewards.registry import get_reward_fn, warm_up

DEFAULT_TIMEOUT_S = 5.0  # rewards take milliseconds; this only stops pathological responses or hung scorers
TIMEOUT_METRIC = "reward/timeouts"

_SHARED_POOLS: dict[int, RewardPool] = {}
_SHARED_LANE: list[ThreadLane] = []
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int) -> RewardPool:
    """The process-wide pool of `workers` reward processes (started on first use, closed at exit)."""
    with _SHARED_LOCK:
        if workers not in _SHARED_POOLS:
            _SHARED_POOLS[workers] = RewardPool(workers)
        return _SHARED_POOLS[workers]


def shared_lane() -> ThreadLane:
    with _SHARED_LOCK:
        if not _SHARED_LANE:
            _SHARED_LANE.append(ThreadLane())
        return _SHARED_LANE[0]


def close_shared_pools() -> None:
    """Shut down the shared pools and the shared thread lane (also run at interpreter exit)."""
    with _SHARED_LOCK:
        runners = [*_SHARED_POOLS.values(), *_SHARED_LANE]
        _SHARED_POOLS.clear()
        _SHARED_LANE.clear()
    for r in runners:
        r.close()


atexit.register(close_shared_pools)


class RewardScorer:
    """Scores responses with the reward `name`, one future per sample; counts timeouts (each scored 0.0)."""

    def __init__(self, name: str, *, workers: int = 0, timeout: float | None = DEFAULT_TIMEOUT_S,
                 format_reward: float = 0.0, partial_credit: bool = False, pool: RewardPool | None = None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError(f"reward timeout must be >= 0 seconds (0 = none), got {timeout}")
        if workers < 0:
            raise ValueError(f"reward workers must be >= 0, got {workers}")
        # resolve here: an unknown name or bad option fails in the caller, before anything is generated
        self._fn = get_reward_fn(name, format_reward=format_reward, partial_credit=partial_credit)
        self.name, self.workers, self.timeout = name, workers, (timeout or None)
        self.format_reward, self.partial_credit = format_reward, partial_credit
        self.timeouts = 0  # since creation
        self._reported = 0
        self._lock = threading.Lock()
        self._pool = pool or (shared_pool(workers) if workers > 0 else None)
        self._lane = shared_lane() if self._pool is None and self.timeout is not None else None
        if self._lane is not None:
            warm_up(name)  # imports are not part of any sample's deadline

    def submit(self, response: str, sample: PromptSample) -> Future:
        """A future of `response`'s score against `sample` (0.0 if scoring takes longer than the timeout)."""
        if self._pool is not None:
            return self._pool.submit(self.name, response, sample, format_reward=self.format_reward,
                                     partial_credit=self.partial_credit, timeout=self.timeout,
                                     on_timeout=self._count_timeout)
        job = Job(self.name, response, sample, self.format_reward, self.partial_credit, self.timeout,
                  self._count_timeout)
        if self._lane is not None:
            return self._lane.submit(job).future
        try:
            settle(job, True, self._fn(response, sample))
        except Exception as e:  # noqa: BLE001 - raised from the future, as for the other modes
            settle(job, False, e)
        return job.future

    def score_batch(self, responses: Sequence[str], samples: Sequence[PromptSample]) -> list[float]:
        """Scores of `responses[i]` against `samples[i]`, in order (blocking)."""
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        futures = [self.submit(r, s) for r, s in zip(responses, samples, strict=True)]
        return [f.result() for f in futures]

    def wait_ready(self, timeout: float | None = None) -> bool:
        """With worker processes: block until they have started (call it before generation, so that scoring the
        first finished samples does not wait for start-up); False if `timeout` passed first. Inline: True."""
        return self._pool.wait_ready(timeout) if self._pool is not None else True

    def pop_timeouts(self) -> int:
        """Timeouts since the previous call (per-step metric `reward/timeouts`)."""
        with self._lock:
            new, self._reported = self.timeouts - self._reported, self.timeouts
        return new

    def _count_timeout(self) -> None:
        with self._lock:
            self.timeouts += 1


_SCORERS: dict[tuple, RewardScorer] = {}


def score_batch(
    reward_fn_name: str,
    responses: Sequence[str],
    samples: Sequence[PromptSample],
    *,
    num_workers: int = 0,
    format_reward: float = 0.0,
    partial_credit: bool = False,
    timeout: float | None = None,
) -> list[float]:
    """Score a batch inline (`num_workers=0`) or in the shared pool of `num_workers` processes, each sample bounded
    by `timeout` seconds (None: no limit inline, and no deadline in the pool)."""
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
    key = (reward_fn_name, num_workers, timeout, format_reward, partial_credit)
    if key not in _SCORERS:
        _SCORERS[key] = RewardScorer(reward_fn_name, workers=num_workers, timeout=timeout,
                                     format_reward=format_reward, partial_credit=partial_credit)
    return _SCORERS[key].score_batch(responses, samples)
