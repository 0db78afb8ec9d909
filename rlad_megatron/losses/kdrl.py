"""KDRL baseline (RLAD Eq. 2; Xu et al. 2025): GRPO + ``kl_coef * KL(student || teacher)`` on sampled tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from rlad_megatron.losses._checks import check_logprobs, check_mask, check_number
from rlad_megatron.losses.agg import aggregate, masked_mean
from rlad_megatron.losses.kl import check_loss_estimator, kl_estimate
from rlad_megatron.losses.trrd import grpo_loss

__all__ = ["kdrl_loss"]


def kdrl_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k2",
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "seq-mean-token-mean",
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``grpo_loss(...) + kl_coef * agg(k(logp - teacher_logp))``, all inputs ``[batch, resp_len]``.

    The reverse KL ``KL(pi_S || pi_T)`` is estimated on the student's own rollout tokens with ``k2`` (reverse-KL
    gradient, default) or ``k3`` (forward-KL gradient); ``k1`` is refused (zero expected gradient, ``kl.py``). The
    teacher enters only through this term (no teacher in the ratio). ``advantages`` is
    ``[batch]`` or ``[batch, resp_len]``. Metrics: those of ``grpo_loss`` plus ``kl_teacher`` (token mean of the
    estimator) and ``log_ratio_teacher_mean``.
    """
    check_number("kl_coef", kl_coef, 0.0)
    check_loss_estimator(kl_estimator)
    mask = check_mask(mask)
    check_logprobs("teacher_logp", teacher_logp, mask)
    pg_loss, metrics = grpo_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high, agg=agg,
                                 dual_clip=dual_clip)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    student, teacher = torch.where(mask, logp, zero), torch.where(mask, teacher_logp, zero)
    kl_t = kl_estimate(student, teacher, kl_estimator)
    loss = pg_loss + kl_coef * aggregate(kl_t, mask, agg)
    metrics.update(loss=loss.detach().float(), kl_teacher=masked_mean(kl_t, mask),
                   log_ratio_teacher_mean=masked_mean(student - teacher, mask))
    return loss, metrics
