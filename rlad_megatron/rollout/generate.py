"""Generate with an engine, decode, and score with the training reward: the one routine behind training rollouts,
evaluation during training and `rlad-eval`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from rlad_megatron.rewards import DEFAULT_TIMEOUT_S, score_batch
from rlad_megatron.rollout.base import Rollout, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class RewardSpec:
    """How samples are scored: reward registry name (or module:function), process-pool size, format bonus, and the
    per-sample deadline in seconds (a sample scored longer gets 0; None/0 = no limit; `rewards.scorer`)."""

    name: str
    workers: int = 0
    format_reward: float = 0.0
    timeout: float | None = DEFAULT_TIMEOUT_S


def generate_and_score(engine: RolloutEngine, samples: Sequence, *, n: int, sampling: SamplingParams, tokenizer,
                       reward: RewardSpec, batch_size: int | None = None
                       ) -> tuple[list[Rollout], list[str], list[float]]:
    """`n` samples per prompt, flat in `prompt x n` order: (rollouts, decoded texts, rewards).

    Generation runs `batch_size` sequences at a time (None: all at once). Sequence j of the flattened list samples
    with seed `sampling.seed + j`, so the result does not depend on `batch_size`.
    """
    prompts = [s.prompt_ids for s in samples for _ in range(n)]
    step = batch_size or max(len(prompts), 1)
    rollouts: list[Rollout] = []
    for start in range(0, len(prompts), step):
        sp = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + start)
        rollouts += engine.generate(prompts[start:start + step], sp)
    texts = [r.text or tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in rollouts]
    scores = score_batch(reward.name, texts, [s for s in samples for _ in range(n)], num_workers=reward.workers,
                         format_reward=reward.format_reward, timeout=reward.timeout)
    return rollouts, texts, scores


def per_prompt(flat: Sequence, n: int) -> list[list]:
    """`prompt x n` flat order -> one list of `n` per prompt."""
    return [list(flat[i:i + n]) for i in range(0, len(flat), n)]
