"""How far TRRD's update is from GRPO's on the same tokens: per-token gradient weights, their relative difference
norm, and the gated fractions, by advantage sign (issue 12).

Both losses are ``L = agg_t(loss_t)`` over the response tokens (``[batch, resp_len]``, ``mask``), with
``loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)`` (+ dual clip) and

    GRPO: log r_t = logp_t - old_logp_t
    TRRD: log r_t = alpha (logp_t - old_logp_t) + (1 - alpha) clamp(logp_t - teacher_logp_t, -c, c)

The gradient of either loss is ``dL/dtheta = sum_t (dL/dlogp_t) dlogp_t/dtheta``, so the whole difference between
the two updates at one parameter point lies in the per-token weights

    w_t := -dL/dlogp_t = (k_t / D) * A_t * r_t * s_t * u_t

* ``k_t / D``: the aggregation weight of token t (``token-mean``: 1 / N; ``seq-mean-token-mean``: 1 / (B |y_b|);
  ``seq-mean-token-sum``: 1 / B), the same for both methods. ``D`` (N tokens, or B non-empty sequences) is the
  batch's loss count (`step/update.py` ``loss_count``); ``k_t`` (1, 1/|y_b|, 1) does not depend on the batch;
* ``s_t = dlog r_t / dlogp_t``: 1 for GRPO; ``alpha + (1 - alpha) 1[|logp_t - teacher_logp_t| <= c]`` for TRRD
  (the hard clamp passes no gradient through the teacher term);
* ``u_t``: 1 when the surrogate is on its unclipped branch (not ``A > 0, r > 1 + eps_high``; not
  ``A < 0, r < 1 - eps_low``; not ``A < 0, r > dual_clip``), else 0.

Reported (all over masked tokens; ``pos``/``neg`` restrict to ``A > 0`` / ``A < 0``):

* ``sumsq_{diff,grpo}{,_pos,_neg}``, ``sumsq_trrd``: ``sum_t (D (w^TRRD - w^GRPO))^2``, ``sum_t (D w^GRPO)^2``,
  ``sum_t (D w^TRRD)^2``. The ``D`` scaling makes them additive: a mini-batch split into micro-batches (and ranks)
  has the loss ``sum_mb D_mb L_mb / D``, so summing these over its parts gives ``D^2`` times the sums of the whole
  batch, and ratios of pooled sums are the whole batch's ratios (a mean of per-batch ratios is not);
* ``rel_diff{,_pos,_neg} = sqrt(sumsq_diff / sumsq_grpo)``: ``||w^TRRD - w^GRPO|| / ||w^GRPO||`` (0 = the same
  update; 1 = a difference as large as GRPO's update);
* ``cosine = <w^TRRD, w^GRPO> / (||w^TRRD|| ||w^GRPO||) = (sumsq_trrd + sumsq_grpo - sumsq_diff) /
  (2 sqrt(sumsq_trrd sumsq_grpo))``;
* ``gated_{blocked,enabled}_{pos,neg}``: token fractions with ``w^GRPO != 0, w^TRRD == 0`` (blocked) or the reverse;
* ``diff_share_{gated,clamped,rescaled}``: the parts of ``||w^TRRD - w^GRPO||^2`` from gated tokens, from live
  tokens whose teacher log-ratio is clamped, and from the remaining live tokens (the three sum to 1);
* ``weight_ratio_mean``: mean of ``w^TRRD / w^GRPO`` over tokens live in both (the pure rescaling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlad_megatron.losses._checks import check_advantages, check_agg, check_logprobs, check_mask
from rlad_megatron.losses.agg import masked_mean
from rlad_megatron.losses.ppo import clip_regions

__all__ = ["agg_weights", "grpo_weight_metrics", "pooled_ratios", "surrogate_weights", "trrd_vs_grpo"]

F64 = torch.float64


def agg_weights(mask: Tensor, agg: str) -> tuple[Tensor, Tensor]:
    """``(k, D)``: ``agg.aggregate(v, mask, agg) = sum_t k_t v_t / D``; ``k`` ``[batch, resp_len]`` float64 (0 where
    masked), ``D`` 0-dim float64 (tokens for ``token-mean``, sequences with any token otherwise)."""
    check_agg(agg)
    m = mask.to(F64)
    if agg == "token-mean":
        return m, m.sum()
    tokens = m.sum(dim=-1, keepdim=True)
    k = m / tokens.clamp(min=1) if agg == "seq-mean-token-mean" else m
    return k, (tokens > 0).sum().to(F64)


def live(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None) -> Tensor:
    """Bool ``[batch, resp_len]``: the surrogate passes a gradient to ``r`` (unclipped branch and ``A != 0``)."""
    low, high, dual = clip_regions(ratio, adv, eps_low, eps_high, dual_clip)
    return (adv != 0) & ~(low | high | dual)


def teacher_slope(lr_teacher: Tensor, alpha: float, teacher_clamp: float | None) -> Tensor:
    """``s = dlog r / dlogp = alpha + (1 - alpha) 1[|lr_teacher| <= c]`` (``torch.clamp`` passes the gradient at
    ``+-c``), float64 ``[batch, resp_len]``; 1 without a clamp."""
    if teacher_clamp is None:
        return torch.ones_like(lr_teacher, dtype=F64)
    return alpha + (1.0 - alpha) * (lr_teacher.abs() <= teacher_clamp).to(F64)


def policy_weights(ratio: Tensor, slope: Tensor, adv: Tensor, mask: Tensor, k: Tensor, eps_low: float,
                   eps_high: float, dual_clip: float | None) -> Tensor:
    """``k A r s u`` float64 ``[batch, resp_len]`` (0 where masked or clipped); inputs finite where ``mask``."""
    on = live(ratio, adv, eps_low, eps_high, dual_clip) & mask
    return torch.where(on, k * adv.to(F64) * ratio.to(F64) * slope, torch.zeros((), dtype=F64, device=k.device))


def weight_sums(w_t: Tensor, w_g: Tensor, adv: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The module doc's ``sumsq_*`` of TRRD/GRPO weights ``w_t``, ``w_g`` (0 where masked), float64 0-dim."""
    d2, g2 = (w_t - w_g) ** 2, w_g**2
    out: dict[str, Tensor] = {}
    for tag, sel in (("", mask), ("_pos", mask & (adv > 0)), ("_neg", mask & (adv < 0))):
        out[f"sumsq_diff{tag}"] = d2[sel].sum()
        out[f"sumsq_grpo{tag}"] = g2[sel].sum()
    out["sumsq_trrd"] = (w_t[mask] ** 2).sum()
    return out


def pooled_ratios(sums: dict[str, Tensor | float]) -> dict[str, float]:
    """``rel_diff{,_pos,_neg}`` and ``cosine`` from ``sumsq_*`` sums of one batch or pooled over many. A ratio whose
    denominator is 0 (no GRPO weight on those tokens; for ``cosine`` also none under TRRD) is left out."""
    s = {k: float(v) for k, v in sums.items()}
    out = {}
    for tag in ("", "_pos", "_neg"):
        if s[f"sumsq_grpo{tag}"] > 0:
            out[f"rel_diff{tag}"] = (s[f"sumsq_diff{tag}"] / s[f"sumsq_grpo{tag}"]) ** 0.5
    t, g = s["sumsq_trrd"], s["sumsq_grpo"]
    if t > 0 and g > 0:
        out["cosine"] = (t + g - s["sumsq_diff"]) / (2.0 * (t * g) ** 0.5)
    return out


@torch.no_grad()
def grpo_weight_metrics(ratio: Tensor, lr_old: Tensor, lr_teacher: Tensor, adv: Tensor, mask: Tensor, *,
                        alpha: float, teacher_clamp: float | None, agg: str, eps_low: float, eps_high: float,
                        dual_clip: float | None) -> dict[str, Tensor]:
    """`trrd_loss`'s ``grpo_weight_*`` metrics (detached 0-dim fp32) from the tensors its loss used, all
    ``[batch, resp_len]`` and 0 where masked: the TRRD ``ratio``, ``lr_old = logp - old_logp``, the unclamped
    ``lr_teacher = logp - teacher_logp``, ``adv``. Always the ``sumsq_*`` sums (pool them); the per-batch
    ``rel_diff*``/``cosine`` only where defined (see `pooled_ratios`), so a mean over micro-batches stays finite."""
    k, _ = agg_weights(mask, agg)
    kw = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    w_t = policy_weights(ratio, teacher_slope(lr_teacher, alpha, teacher_clamp), adv, mask, k, **kw)
    w_g = policy_weights(torch.exp(lr_old), torch.ones_like(k), adv, mask, k, **kw)
    sums = weight_sums(w_t, w_g, adv, mask)
    out = {**sums, **{name: torch.tensor(v) for name, v in pooled_ratios(sums).items()}}
    return {f"grpo_weight_{name}": v.to(device=mask.device, dtype=torch.float32) for name, v in out.items()}


@torch.no_grad()
def surrogate_weights(logp: Tensor, old_logp: Tensor, teacher_logp: Tensor | None, adv: Tensor, mask: Tensor, *,
                      alpha: float, eps_low: float, eps_high: float, teacher_clamp: float | None, agg: str,
                      dual_clip: float | None = None) -> Tensor:
    """``w = -dL/dlogp`` ``[batch, resp_len]`` float64 of `trrd_loss` (``alpha < 1``) or GRPO (``alpha == 1``);
    arguments as `trrd_vs_grpo`'s."""
    mask = check_mask(mask)
    zero = torch.zeros((), dtype=F64, device=mask.device)
    a = torch.where(mask, check_advantages(adv, mask).to(F64), zero)
    logp, old_logp = torch.where(mask, logp.to(F64), zero), torch.where(mask, old_logp.to(F64), zero)
    log_r, slope = logp - old_logp, torch.ones_like(logp)
    if alpha != 1.0:
        if teacher_logp is None:
            raise ValueError(f"teacher_logp is required when alpha != 1 (got alpha={alpha})")
        lr_t = logp - torch.where(mask, teacher_logp.to(F64), zero)
        slope = teacher_slope(lr_t, alpha, teacher_clamp)
        lr_t = lr_t.clamp(-teacher_clamp, teacher_clamp) if teacher_clamp is not None else lr_t
        log_r = alpha * log_r + (1.0 - alpha) * lr_t
    k, count = agg_weights(mask, agg)
    return policy_weights(torch.exp(log_r), slope, a, mask, k / count, eps_low, eps_high, dual_clip)


@torch.no_grad()
def trrd_vs_grpo(logp: Tensor, old_logp: Tensor, teacher_logp: Tensor, adv: Tensor, mask: Tensor, *,
                 alpha: float = 0.5, eps_low: float = 0.2, eps_high: float = 0.28, teacher_clamp: float | None = 1.0,
                 agg: str = "seq-mean-token-mean", dual_clip: float | None = None) -> dict[str, Tensor]:
    """The module doc's diagnostics for one batch: 0-dim float64 tensors (ratios are NaN when undefined).

    ``logp, old_logp, teacher_logp``: ``[batch, resp_len]`` log-probs of the sampled tokens (student now, rollout
    policy, teacher; anything where masked); ``adv``: ``[batch]`` or ``[batch, resp_len]``; ``mask``: bool/0-1.
    """
    mask = check_mask(mask)
    for name, x in (("logp", logp), ("old_logp", old_logp), ("teacher_logp", teacher_logp)):
        check_logprobs(name, x, mask)
    a = check_advantages(adv, mask)
    kw = dict(eps_low=eps_low, eps_high=eps_high, teacher_clamp=teacher_clamp, agg=agg, dual_clip=dual_clip)
    count = agg_weights(mask, agg)[1]  # D-scaled weights: the sums pool over micro-batches (module doc)
    w_t = surrogate_weights(logp, old_logp, teacher_logp, adv, mask, alpha=alpha, **kw) * count
    w_g = surrogate_weights(logp, old_logp, None, adv, mask, alpha=1.0, **kw) * count
    nan = torch.full((), float("nan"), dtype=F64)
    out: dict[str, Tensor] = weight_sums(w_t, w_g, a, mask)
    out.update({name: nan for name in ("rel_diff", "rel_diff_pos", "rel_diff_neg", "cosine")})
    out.update({name: torch.tensor(v, dtype=F64) for name, v in pooled_ratios(out).items()})
    lr_t = torch.where(mask, logp.to(F64) - teacher_logp.to(F64), 0.0)
    clamped = mask & (lr_t.abs() > teacher_clamp) if teacher_clamp is not None else torch.zeros_like(mask)
    live_t, live_g = w_t != 0, w_g != 0
    blocked, enabled, both = live_g & ~live_t, ~live_g & live_t, live_t & live_g
    for tag, sel in (("pos", a > 0), ("neg", a < 0)):
        out[f"gated_blocked_{tag}"] = masked_mean(blocked & sel, mask).to(F64)
        out[f"gated_enabled_{tag}"] = masked_mean(enabled & sel, mask).to(F64)
    d2 = (w_t - w_g) ** 2
    total = d2.sum()
    for name, sel in (("gated", blocked | enabled), ("clamped", both & clamped), ("rescaled", both & ~clamped)):
        out[f"diff_share_{name}"] = d2[sel].sum() / total if bool(total > 0) else nan
    out["weight_ratio_mean"] = (w_t[both] / w_g[both]).mean() if bool(both.any()) else nan
    out["clamped_frac"] = masked_mean(clamped, mask).to(F64)
    out["zero_adv_frac"] = masked_mean(a == 0, mask).to(F64)
    return out
