"""Reward registry (`get_reward_fn`) and batch scoring, inline or in worker processes (`score_batch`)."""

from rlad_megatron.rewards.pool import RewardPool, close_shared_pools, score_batch
from rlad_megatron.rewards.registry import BUILTIN_REWARDS, RewardFn, get_reward_fn

__all__ = ["BUILTIN_REWARDS", "RewardFn", "RewardPool", "close_shared_pools", "get_reward_fn", "score_batch"]
