"""PPO/GRPO clipped surrogate on a per-token importance ratio, and where its gradient is alive."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                      dual_clip: float | None = None) -> Tensor:
    """Per-token loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, all ``[batch, resp_len]``.

    With ``dual_clip = c > 1`` (Ye et al. 2020), tokens with ``A < 0`` are capped at ``-c A``:
    ``loss = min(loss, -c A)``.
    """
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def clip_regions(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                 dual_clip: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Bool ``[batch, resp_len]`` masks of tokens whose surrogate is the constant clipped branch.

    ``low``: ``A < 0`` and ``r < 1 - eps_low``; ``high``: ``A > 0`` and ``r > 1 + eps_high``;
    ``dual``: ``A < 0`` and ``r > c``. A token with ``A != 0`` in none of them gets a ratio gradient.
    """
    low = (adv < 0) & (ratio < 1.0 - eps_low)
    high = (adv > 0) & (ratio > 1.0 + eps_high)
    dual = (adv < 0) & (ratio > dual_clip) if dual_clip is not None else torch.zeros_like(low)
    return low, high, dual
