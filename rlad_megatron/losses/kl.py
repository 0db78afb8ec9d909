"""Single-sample estimators of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman, 2020), and which of them
may be a loss term.

With ``lr = log pi(y) - log ref(y)`` at the sampled token ``y ~ pi`` and the gradient flowing through ``log pi(y)``
only (the sample is fixed, as in every RL loss here), the expected gradient over ``y`` is:

| estimator | value                   | value E_y        | gradient E_y[grad k(y)]                                   |
|-----------|-------------------------|------------------|-----------------------------------------------------------|
| ``k1``    | ``lr``                  | KL(pi‖ref)       | ``sum_y pi grad log pi = 0``: no signal; refused as a loss |
| ``k2``    | ``lr**2 / 2``           | biased (>= 0)    | ``sum_y pi lr grad log pi = grad KL(pi‖ref)`` (reverse KL)  |
| ``k3``    | ``exp(-lr) - 1 + lr``   | KL(pi‖ref)       | ``-sum_y ref grad log pi = grad KL(ref‖pi)`` (FORWARD KL)  |

So ``k2`` is the estimator whose gradient is the reverse-KL gradient the KDRL / ``beta * KL(pi || ref)`` terms
intend: it is the default for every KL used as a loss term. ``k3`` is accepted (its value is unbiased, it is what
several RL libraries use), but it pulls ``pi`` toward covering ``ref`` (forward KL). ``k1`` stays available as a
metric (``kl_estimate``) and is refused as a loss term by ``check_loss_estimator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_KL_ESTIMATORS = ("k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token estimate with ``lr = logp - ref_logp`` (same shapes, e.g. ``[batch, resp_len]``):
    ``k1 = lr``, ``k2 = 0.5 * lr**2``, ``k3 = exp(-lr) - 1 + lr`` (see the module table)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    lr = logp - ref_logp
    if estimator == "k1":
        return lr
    if estimator == "k2":
        return 0.5 * lr.square()
    return torch.exp(-lr) - 1.0 + lr


def check_loss_estimator(estimator: str) -> None:
    """A KL estimator used as a loss term: ``k2`` or ``k3``; ``k1`` is refused with the reason."""
    if estimator == "k1":
        raise ValueError("kl_estimator 'k1' cannot be a loss term: its gradient is zero in expectation over the "
                         "sampled tokens (E[grad log pi] = 0), so the KL term would add noise and no signal; use k2 "
                         "(reverse-KL gradient, the default) or k3 (forward-KL gradient)")
    if estimator not in LOSS_KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {LOSS_KL_ESTIMATORS}, got {estimator!r}")
