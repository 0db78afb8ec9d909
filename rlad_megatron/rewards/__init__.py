"""Reward registry (`get_reward_fn`) and scoring with per-sample deadlines: `RewardScorer` (futures, inline
thread or worker processes) and the blocking `score_batch`."""

from rlad_megatron.rewards.pool import RewardPool
from rlad_megatron.rewards.registry import BUILTIN_REWARDS, RewardFn, get_reward_fn
from rlad_megatron.rewards.scorer import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_METRIC,
    RewardScorer,
    close_shared_pools,
    score_batch,
)

__all__ = ["BUILTIN_REWARDS", "DEFAULT_TIMEOUT_S", "TIMEOUT_METRIC", "RewardFn", "RewardPool", "RewardScorer",
           "close_shared_pools", "get_reward_fn", "score_batch"]
