"""Generate with one engine, decode, and score with the training reward: `rlad-eval` and any single-engine caller.
Data-parallel callers use the same pieces (`dispatch.run_engine` per engine + `exchange.gather_chunks`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlad_megatron.rewards import DEFAULT_TIMEOUT_S, RewardScorer
from rlad_megatron.rollout.base import Rollout, RolloutEngine, SamplingParams
from rlad_megatron.rollout.dispatch import LocalQueue, WorkPlan, flatten, run_engine


@dataclass(frozen=True)
class RewardSpec:
    """How samples are scored: reward registry name (or module:function), process-pool size, format bonus, and the
    per-sample deadline in seconds (a sample scored longer gets 0; None/0 = no limit; `rewards.scorer`)."""

    name: str
    workers: int = 0
    format_reward: float = 0.0
    timeout: float | None = DEFAULT_TIMEOUT_S


def make_scorer(spec: RewardSpec) -> RewardScorer:
    """Per-sample reward futures (`rewards.RewardScorer`): a background thread (workers = 0) or worker processes,
    each sample bounded by `spec.timeout` (scored 0 and counted past it)."""
    return RewardScorer(spec.name, workers=spec.workers, timeout=spec.timeout, format_reward=spec.format_reward)


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
