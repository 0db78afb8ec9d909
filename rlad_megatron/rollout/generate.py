"""Generate with one engine, decode, and score with the training reward: `rlad-eval` and any single-engine caller.
Data-parallel callers use the same pieces (`dispatch.run_engine` per engine + `exchange.gather_chunks`)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from rlad_megatron.rewards import get_reward_fn
from rlad_megatron.rollout.base import Rollout, RolloutEngine, SamplingParams
from rlad_megatron.rollout.dispatch import LocalQueue, Scorer, WorkPlan, flatten, run_engine


@dataclass(frozen=True)
class RewardSpec:
    """How samples are scored: reward registry name (or module:function), process-pool size, format bonus."""

    name: str
    workers: int = 0
    format_reward: float = 0.0


class ThreadScorer:
    """Scores in one background thread, so rewards overlap generation."""

    def __init__(self, spec: RewardSpec) -> None:
        self._fn = get_reward_fn(spec.name, format_reward=spec.format_reward)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def submit(self, response: str, sample) -> Future:
        return self._pool.submit(self._fn, response, sample)


def make_scorer(spec: RewardSpec) -> Scorer:
    return ThreadScorer(spec)


def generate_and_score(engine: RolloutEngine, samples: Sequence, *, n: int, sampling: SamplingParams, tokenizer,
                       reward: RewardSpec, batch_size: int | None = None) -> tuple[list[Rollout], list[float]]:
    """`n` samples per prompt, flat in `prompt x n` order: (rollouts with their decoded `text`, rewards).

    Generation runs about `batch_size` sequences (whole prompt groups) at a time (None: all at once). Sequence j of
    the flat list samples with seed `sampling.seed + j`, so the result does not depend on `batch_size`.
    """
    groups = max(1, (batch_size or n * max(len(samples), 1)) // n)
    plan = WorkPlan(samples, n, chunk_groups=groups)
    work = run_engine(engine, plan, LocalQueue(plan.chunks), sampling=sampling, tokenizer=tokenizer,
                      scorer=make_scorer(reward))
    return flatten(work.results, plan)


def per_prompt(flat: Sequence, n: int) -> list[list]:
    """`prompt x n` flat order -> one list of `n` per prompt."""
    return [list(flat[i:i + n]) for i in range(0, len(flat), n)]
