"""Input validation shared by the losses: every problem is a ``ValueError`` naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def check_mask(mask: Tensor, shape: torch.Size | None = None) -> Tensor:
    """``[batch, resp_len]`` 0/1 or bool mask -> bool mask; rejects bad shapes, non-0/1 values, no tokens."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [batch, resp_len] tensor, got {_describe(mask)}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {tuple(shape)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0/1 (or bool) values")
        mask = mask != 0
    if not bool(mask.any()):
        raise ValueError("mask selects no tokens (mask.sum() == 0): the loss would be undefined")
    return mask


def check_logprobs(name: str, x: Tensor, mask: Tensor) -> None:
    """``x``: floating ``[batch, resp_len]`` like ``mask``; finite wherever ``mask`` is on."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {_describe(x)}")
    if x.shape != mask.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} must equal mask shape {tuple(mask.shape)}")
    _check_finite(name, x, mask)


def check_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """``[batch]`` or ``[batch, resp_len]`` advantages -> ``[batch, resp_len]`` (finite where ``mask``)."""
    if not isinstance(advantages, Tensor) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating tensor, got {_describe(advantages)}")
    if advantages.shape == mask.shape[:1]:
        advantages = advantages[:, None].expand(mask.shape)
    elif advantages.shape != mask.shape:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be [batch]={tuple(mask.shape[:1])} "
                         f"or [batch, resp_len]={tuple(mask.shape)}")
    _check_finite("advantages", advantages, mask)
    return advantages


def check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def check_number(name: str, value: float, lo: float, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    """``value`` in the interval ``[lo, hi]`` (ends open on request); rejects NaN."""
    ok = isinstance(value, (int, float)) and not math.isnan(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_finite(name: str, x: Tensor, mask: Tensor) -> None:
    bad = ~torch.isfinite(x) & mask
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) at unmasked positions, first at {i}: "
                         f"{float(x[i])}")


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
