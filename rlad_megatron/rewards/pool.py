"""Batch scoring, inline or in a `ProcessPoolExecutor`.

Workers receive the reward *name* and resolve it with `get_reward_fn` themselves, so only names
and picklable `PromptSample`s cross the process boundary. Scoring runs on each worker's main
thread, where math-verify's `signal.alarm` timeouts work. Workers use the `spawn` start method by
default (safe after torch/CUDA/threads in the parent); with spawn the parent's `__main__` is
re-imported in each worker, so entry scripts need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import atexit
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Self

from rlad_megatron.data.prompts import PromptSample
from rlad_megatron.rewards.registry import get_reward_fn


def _score_inline(
    name: str, responses: Sequence[str], samples: Sequence[PromptSample], format_reward: float, partial_credit: bool
) -> list[float]:
    fn = get_reward_fn(name, format_reward=format_reward, partial_credit=partial_credit)
    return [fn(r, s) for r, s in zip(responses, samples, strict=True)]


class RewardPool:
    """A persistent pool of reward workers; reuse it across training steps, `close()` at the end."""

    def __init__(self, num_workers: int, start_method: str = "spawn") -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        ctx = multiprocessing.get_context(start_method)
        self._executor = ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx)

    def score(
        self,
        name: str,
        responses: Sequence[str],
        samples: Sequence[PromptSample],
        *,
        format_reward: float = 0.0,
        partial_credit: bool = False,
        chunks_per_worker: int = 4,
    ) -> list[float]:
        """Rewards of `responses[i]` against `samples[i]`, in order."""
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        get_reward_fn(name, format_reward=format_reward, partial_credit=partial_credit)  # fail fast in the parent
        n = len(responses)
        step = max(1, -(-n // (self.num_workers * chunks_per_worker)))
        futures = [
            self._executor.submit(
                _score_inline,
                name,
                list(responses[i : i + step]),
                list(samples[i : i + step]),
                format_reward,
                partial_credit,
            )
            for i in range(0, n, step)
        ]
        return [r for f in futures for r in f.result()]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SHARED: dict[int, RewardPool] = {}


def close_shared_pools() -> None:
    """Shut down the pools `score_batch` created (also run at interpreter exit)."""
    while _SHARED:
        _SHARED.popitem()[1].close()


atexit.register(close_shared_pools)


def score_batch(
    reward_fn_name: str,
    responses: Sequence[str],
    samples: Sequence[PromptSample],
    *,
    num_workers: int = 0,
    format_reward: float = 0.0,
    partial_credit: bool = False,
) -> list[float]:
    """Score a batch inline (`num_workers=0`) or in a shared, lazily started pool of `num_workers`."""
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
    if num_workers <= 0:
        return _score_inline(reward_fn_name, responses, samples, format_reward, partial_credit)
    if num_workers not in _SHARED:
        _SHARED[num_workers] = RewardPool(num_workers)
    return _SHARED[num_workers].score(
        reward_fn_name, responses, samples, format_reward=format_reward, partial_credit=partial_credit
    )
