"""TRRD (Trust Region Ratio Distillation, RLAD arXiv 2602.22495 Eqs. 3-5, App. B) and GRPO as its alpha=1 case.

Per token (all tensors ``[batch, resp_len]``):

    log r  = alpha (logp - old_logp) + (1 - alpha) clamp(logp - teacher_logp, -c, c)
    loss_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)      [+ dual clip]  [+ beta KL(pi || ref)]

The anchor is the geometric mixture ``old^alpha teacher^(1-alpha)``; ``alpha = 1`` is exactly GRPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlad_megatron.losses._checks import (
    check_advantages,
    check_agg,
    check_logprobs,
    check_mask,
    check_number,
)
from rlad_megatron.losses.agg import aggregate, masked_mean
from rlad_megatron.losses.kl import check_loss_estimator, kl_estimate
from rlad_megatron.losses.ppo import clip_regions, clipped_surrogate
from rlad_megatron.losses.trrd_vs_grpo import grpo_weight_metrics, live

__all__ = ["check_policy_args", "grpo_loss", "trrd_loss"]


def check_policy_args(eps_low: float, eps_high: float, agg: str, dual_clip: float | None) -> None:
    """Shared validation of the clipped-surrogate hyper-parameters."""
    check_number("eps_low", eps_low, 0.0, 1.0, hi_open=True)
    check_number("eps_high", eps_high, 0.0)
    check_agg(agg)
    if dual_clip is not None:
        check_number("dual_clip", dual_clip, 1.0, lo_open=True)


def trrd_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    alpha: float = 0.5,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    teacher_clamp: float | None = 1.0,
    agg: str = "seq-mean-token-mean",
    dual_clip: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k2",
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRRD clipped surrogate (+ optional ``beta * KL(pi || ref)``), aggregated with ``agg``.

    Args:
        logp, old_logp, teacher_logp, ref_logp: ``[batch, resp_len]`` log-probs of the sampled tokens under
            the student (with grad), the rollout policy, the teacher and the reference. Masked-out positions
            may hold anything (NaN included). ``teacher_logp`` may be ``None`` only when ``alpha == 1``.
        advantages: ``[batch]`` (broadcast over tokens) or ``[batch, resp_len]``.
        mask: ``[batch, resp_len]`` bool or 0/1; the response tokens that count.
        alpha: weight of the old-policy ratio in ``[0, 1]``; 1 = GRPO, 0 = fully teacher-anchored.
        teacher_clamp: ``c`` of the App.-B clamp of ``logp - teacher_logp`` to ``[-c, c]``; ``None`` = no clamp.
        dual_clip: ``c > 1`` caps the loss of ``A < 0`` tokens at ``-c A``; ``None`` = off.
        beta, kl_estimator: reference-KL coefficient and estimator (``k2`` default, ``k3``; ``k1`` is refused as
            a loss term, see ``kl.py``).

    Returns:
        ``(loss, metrics)``: scalar loss; detached 0-dim fp32 metrics. Token fractions are over unmasked tokens:
        ``clip_frac_low/high``, ``dual_clip_frac``, ``zero_adv_frac``, ``adv_pos_frac/neg_frac``,
        ``log_ratio_old_mean``, ``ratio_mean``; with a teacher also ``log_ratio_teacher_mean`` (unclamped),
        ``teacher_clamp_frac`` and the selective-imitation gates ``gate_{blocked,enabled}_{pos,neg}``: tokens
        that get a policy gradient under the plain GRPO ratio but not under TRRD (blocked), or the reverse
        (enabled), by advantage sign; with ``beta > 0`` also ``kl_ref``.
        With a teacher and ``alpha < 1`` also how far the update is from GRPO's on the same tokens
        (``losses/trrd_vs_grpo.py``; ``w`` = per-token ``-dL/dlogp`` times the batch's loss count):
        ``grpo_weight_sumsq_diff{,_pos,_neg}`` = ``sum (w^TRRD - w^GRPO)^2``, ``grpo_weight_sumsq_grpo{,_pos,_neg}``
        = ``sum (w^GRPO)^2``, ``grpo_weight_sumsq_trrd`` (``_pos``/``_neg``: tokens with ``A > 0``/``A < 0``) --
        the primary quantities: means over micro-batches, ranks and steps pool into the whole batch's
        ``rel_diff = sqrt(sumsq_diff / sumsq_grpo)`` and ``cosine = (sumsq_trrd + sumsq_grpo - sumsq_diff) /
        (2 sqrt(sumsq_trrd sumsq_grpo))``; and this batch's ``grpo_weight_rel_diff{,_pos,_neg}`` and
        ``grpo_weight_cosine``, each only when its denominator is non-zero (a mean over micro-batches then
        averages the batches that have one, never a NaN).
    """
    mask = check_mask(mask)
    check_number("alpha", alpha, 0.0, 1.0)
    check_policy_args(eps_low, eps_high, agg, dual_clip)
    check_number("beta", beta, 0.0)
    check_loss_estimator(kl_estimator)
    if teacher_clamp is not None:
        check_number("teacher_clamp", teacher_clamp, 0.0, lo_open=True)
    if teacher_logp is None and alpha != 1.0:
        raise ValueError(f"teacher_logp is required when alpha != 1 (got alpha={alpha})")
    if beta > 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta > 0")
    check_logprobs("logp", logp, mask)
    check_logprobs("old_logp", old_logp, mask)
    if teacher_logp is not None:
        check_logprobs("teacher_logp", teacher_logp, mask)
    if beta > 0.0:
        check_logprobs("ref_logp", ref_logp, mask)
    adv = check_advantages(advantages, mask)

    def clean(x: Tensor) -> Tensor:  # masked positions -> 0 via where (no NaN leaks into values or grads)
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    logp, old_logp, adv = clean(logp), clean(old_logp), clean(adv)
    lr_old = logp - old_logp
    lr_teacher = clean(logp - teacher_logp) if teacher_logp is not None else None
    if alpha == 1.0:
        log_r = lr_old  # exactly GRPO: the teacher term is not even added as 0
    else:
        lr_t = lr_teacher if teacher_clamp is None else torch.clamp(lr_teacher, -teacher_clamp, teacher_clamp)
        log_r = alpha * lr_old + (1.0 - alpha) * lr_t
    ratio = torch.exp(log_r)
    if not bool(torch.isfinite(ratio).all()):  # exp overflow: a silent inf loss or NaN gradient otherwise
        raise ValueError(f"logp/old_logp/teacher_logp: log importance ratio {float(log_r.max()):.1f} overflows exp "
                         f"in {ratio.dtype}; the rollout log-probs do not match the policy")
    loss_t = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip)
    pg_loss = aggregate(loss_t, mask, agg)
    loss = pg_loss
    metrics: dict[str, Tensor] = {"pg_loss": pg_loss.detach().float()}
    if beta > 0.0:
        kl_t = kl_estimate(logp, clean(ref_logp), kl_estimator)
        loss = pg_loss + beta * aggregate(kl_t, mask, agg)
        metrics["kl_ref"] = masked_mean(kl_t, mask)
    metrics["loss"] = loss.detach().float()
    metrics.update(_policy_metrics(ratio, lr_old, adv, mask, eps_low, eps_high, dual_clip))
    if lr_teacher is not None:
        metrics.update(_teacher_metrics(lr_old, lr_teacher, ratio, adv, mask, alpha, eps_low, eps_high,
                                        teacher_clamp, dual_clip))
    if lr_teacher is not None and alpha < 1.0:
        metrics.update(grpo_weight_metrics(ratio, lr_old, lr_teacher, adv, mask, alpha=alpha,
                                           teacher_clamp=teacher_clamp, agg=agg, eps_low=eps_low,
                                           eps_high=eps_high, dual_clip=dual_clip))
    return loss, metrics


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "seq-mean-token-mean",
    dual_clip: float | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k2",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO = ``trrd_loss`` with ``alpha = 1`` and no teacher: ratio ``exp(logp - old_logp)``."""
    return trrd_loss(logp, old_logp, None, advantages, mask, alpha=1.0, eps_low=eps_low, eps_high=eps_high,
                     agg=agg, dual_clip=dual_clip, ref_logp=ref_logp, beta=beta, kl_estimator=kl_estimator)


@torch.no_grad()
def _policy_metrics(ratio: Tensor, lr_old: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float,
                    dual_clip: float | None) -> dict[str, Tensor]:
    low, high, dual = clip_regions(ratio, adv, eps_low, eps_high, dual_clip)
    out = {
        "clip_frac_low": masked_mean(low, mask),
        "clip_frac_high": masked_mean(high, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "log_ratio_old_mean": masked_mean(lr_old, mask),
        "zero_adv_frac": masked_mean(adv == 0, mask),
        "adv_pos_frac": masked_mean(adv > 0, mask),
        "adv_neg_frac": masked_mean(adv < 0, mask),
        "num_tokens": mask.sum().float(),
    }
    if dual_clip is not None:
        out["dual_clip_frac"] = masked_mean(dual, mask)
    return out


@torch.no_grad()
def _teacher_metrics(lr_old: Tensor, lr_teacher: Tensor, ratio: Tensor, adv: Tensor, mask: Tensor, alpha: float,
                     eps_low: float, eps_high: float, teacher_clamp: float | None,
                     dual_clip: float | None) -> dict[str, Tensor]:
    """Teacher log-ratio stats and the selective-imitation gates (TRRD vs the GRPO ratio on the same tokens)."""
    clamped = lr_teacher.abs() > teacher_clamp if teacher_clamp is not None else torch.zeros_like(mask)

    grpo_alive = live(torch.exp(lr_old), adv, eps_low, eps_high, dual_clip)
    # d log r / d logp = alpha + (1 - alpha) 1[not clamped]: zero only for alpha == 0 on a clamped token
    no_slope = clamped if alpha == 0.0 else torch.zeros_like(clamped)
    trrd_alive = live(ratio, adv, eps_low, eps_high, dual_clip) & ~no_slope
    blocked, enabled = grpo_alive & ~trrd_alive, ~grpo_alive & trrd_alive
    pos, neg = adv > 0, adv < 0
    return {
        "log_ratio_teacher_mean": masked_mean(lr_teacher, mask),
        "teacher_clamp_frac": masked_mean(clamped, mask),
        "gate_blocked_pos": masked_mean(blocked & pos, mask),
        "gate_blocked_neg": masked_mean(blocked & neg, mask),
        "gate_enabled_pos": masked_mean(enabled & pos, mask),
        "gate_enabled_neg": masked_mean(enabled & neg, mask),
    }
