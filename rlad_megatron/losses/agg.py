"""Aggregation of per-token losses ``[batch, resp_len]`` into a scalar."""

from __future__ import annotations

import torch
from torch import Tensor

from rlad_megatron.losses._checks import check_agg


def aggregate(values: Tensor, mask: Tensor, agg: str) -> Tensor:
    """Masked reduction of ``values`` ``[batch, resp_len]`` (bool ``mask`` of the same shape).

    * ``token-mean``:          sum_{b,t} m v / sum_{b,t} m
    * ``seq-mean-token-mean``: mean_b (sum_t m v / sum_t m)   (GRPO paper, Eq. 1)
    * ``seq-mean-token-sum``:  mean_b sum_t m v
    Sequences without any unmasked token are left out of the mean over ``b``. Masked positions are
    removed with ``torch.where``, so NaN/inf there never reaches the result or its gradient.
    """
    check_agg(agg)
    v = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if agg == "token-mean":
        return v.sum() / mask.sum()
    tokens = mask.sum(dim=-1)
    per_seq = v.sum(dim=-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / tokens.clamp(min=1)
    return per_seq.sum() / (tokens > 0).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached fp32 token mean of ``values`` over ``mask`` (for metrics)."""
    with torch.no_grad():
        v = torch.where(mask, values.detach().float(), 0.0)
        return v.sum() / mask.sum()
