"""GRPO group-normalised advantages (RLAD Eq. 1) and the dynamic-sampling filter."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["broadcast_to_tokens", "dynamic_sampling_mask", "grpo_advantages"]


def _check_rewards(rewards: Tensor) -> Tensor:
    if not isinstance(rewards, Tensor) or rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty [num_prompts, group] tensor, got "
                         f"{tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__}")
    if rewards.dtype == torch.bool or not (rewards.is_floating_point() or rewards.dtype.is_signed):
        raise ValueError(f"rewards must be a real-valued tensor, got {rewards.dtype}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    return rewards


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """``A = (r - mean_g r) / (std_g r + eps)`` per prompt; ``rewards`` / result ``[num_prompts, group]``.

    ``std`` is the population std (``1/G``). A group whose rewards are all equal (including ``G = 1``) gets
    exactly zero advantage, independent of floating-point rounding in the mean.
    """
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    rewards = _check_rewards(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, unbiased=False, keepdim=True)
    constant = (rewards == rewards[:, :1]).all(dim=-1, keepdim=True)
    adv = (rewards - mean) / torch.where(constant, 1.0, std + eps)
    return torch.where(constant, torch.zeros_like(adv), adv)


def dynamic_sampling_mask(rewards: Tensor) -> Tensor:
    """``[num_prompts]`` bool: keep the groups whose rewards are not all equal (non-zero advantage)."""
    rewards = _check_rewards(rewards)
    return ~(rewards == rewards[:, :1]).all(dim=-1)


def broadcast_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Sequence advantages ``[batch]`` -> ``[batch, resp_len]``, zero where ``mask`` is off."""
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(f"advantages [batch] and mask [batch, resp_len] must agree, got "
                         f"{tuple(advantages.shape)} and {tuple(mask.shape)}")
    return torch.where(mask.bool(), advantages[:, None], advantages.new_zeros(()))
