"""Single-sample estimators of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman, 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate with ``lr = logp - ref_logp`` (same shapes, e.g. ``[batch, resp_len]``):

    * ``k1 = lr``                    unbiased, high variance, can be negative
    * ``k2 = 0.5 * lr**2``           biased, low variance, gradient ``lr * dlogp`` (= reverse-KL gradient)
    * ``k3 = exp(-lr) - 1 + lr``     unbiased, non-negative
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    lr = logp - ref_logp
    if estimator == "k1":
        return lr
    if estimator == "k2":
        return 0.5 * lr.square()
    return torch.exp(-lr) - 1.0 + lr
