"""rlad_megatron.losses.trrd_vs_grpo: TRRD's per-token gradient weights against autograd of the losses, the hand
cases of issue 12 (gate, clamp), pooling over micro-batches, and the ``grpo_weight_*`` metrics of `trrd_loss`."""

from __future__ import annotations

import math

import pytest
import torch

from rlad_megatron.losses.trrd import grpo_loss, trrd_loss
from rlad_megatron.losses.trrd_vs_grpo import pooled_ratios, surrogate_weights, trrd_vs_grpo

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
SUMS = ["sumsq_diff", "sumsq_diff_pos", "sumsq_diff_neg", "sumsq_grpo", "sumsq_grpo_pos", "sumsq_grpo_neg",
        "sumsq_trrd"]


def _batch(seed: int = 0, b: int = 6, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # a later update: pi_S != pi_old
    teacher = old + 1.2 * torch.randn(b, t, generator=g, dtype=torch.float64)  # some |log pi_S/pi_T| > 1
    adv = torch.tensor([1.2, -0.7, 0.0, 0.5, -1.5, 2.0], dtype=torch.float64)[:b]
    lens = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lens[:, None]
    for x in (old, logp, teacher):
        x[~mask] = float("nan")  # masked positions may hold anything
    return logp, old, teacher, adv, mask


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_weights_equal_autograd(agg, dual_clip, alpha):
    logp, old, teacher, adv, mask = _batch()
    x = logp.clone().requires_grad_(True)
    kw = dict(eps_low=0.2, eps_high=0.28, agg=agg, dual_clip=dual_clip)
    if alpha == 1.0:
        loss, _ = grpo_loss(x, old, adv, mask, **kw)
    else:
        loss, _ = trrd_loss(x, old, teacher, adv, mask, alpha=alpha, teacher_clamp=1.0, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    w = surrogate_weights(logp, old, teacher, adv, mask, alpha=alpha, teacher_clamp=1.0, **kw)
    assert bool((grad[mask] != 0).any()) and bool((grad[mask] == 0).any())  # live and dead tokens both occur
    torch.testing.assert_close(w[mask], -grad[mask], rtol=1e-10, atol=1e-14)
    assert bool((w[~mask] == 0).all())


def test_alpha_one_is_grpo():
    logp, old, teacher, adv, mask = _batch(1)
    d = trrd_vs_grpo(logp, old, teacher, adv, mask, alpha=1.0)
    assert float(d["sumsq_grpo"]) > 0
    assert float(d["rel_diff"]) == 0.0 and float(d["cosine"]) == pytest.approx(1.0)
    assert all(float(d[f"gated_{k}_{s}"]) == 0 for k in ("blocked", "enabled") for s in ("pos", "neg"))
    _, m = trrd_loss(logp, old, teacher, adv, mask, alpha=1.0)  # GRPO itself: nothing to compare
    assert not any(k.startswith("grpo_weight_") for k in m)


def test_first_update_example_of_the_issue():
    """pi_S = pi_old, log pi_S/pi_T = +0.8, alpha 0.5: r = exp(0.4) = 1.49 > 1.28, so an A > 0 token is clipped
    (zero weight) where GRPO's weight is A (blocked); an A < 0 token keeps weight r A = 1.49 A (no lower clip)."""
    old = torch.tensor([[-1.0], [-1.0]], dtype=torch.float64)
    teacher = old - 0.8
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    kw = dict(eps_low=0.2, eps_high=0.28, teacher_clamp=1.0, agg="token-mean")
    w_t = surrogate_weights(old, old, teacher, adv, mask, alpha=0.5, **kw)
    w_g = surrogate_weights(old, old, None, adv, mask, alpha=1.0, **kw)
    r = math.exp(0.4)
    assert r > 1.28
    torch.testing.assert_close(w_g[:, 0], torch.tensor([0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(w_t[:, 0], torch.tensor([0.0, -0.5 * r], dtype=torch.float64))
    d = trrd_vs_grpo(old, old, teacher, adv, mask, alpha=0.5, teacher_clamp=1.0, agg="token-mean")
    assert float(d["gated_blocked_pos"]) == 0.5 and float(d["gated_enabled_pos"]) == 0.0
    assert float(d["rel_diff_pos"]) == pytest.approx(1.0)
    assert float(d["rel_diff_neg"]) == pytest.approx(r - 1.0)
    assert float(d["cosine"]) == pytest.approx(1 / math.sqrt(2))  # <(0, -r), (1, -1)> / (r sqrt 2)
    # the same numbers from trrd_loss's metrics; sums are of D w = 2 w (two tokens)
    _, m = trrd_loss(old.clone().requires_grad_(True), old, teacher, adv, mask, alpha=0.5, teacher_clamp=1.0,
                     agg="token-mean")
    assert m["grpo_weight_sumsq_grpo_pos"].item() == pytest.approx(1.0)
    assert m["grpo_weight_sumsq_diff_pos"].item() == pytest.approx(1.0)
    assert m["grpo_weight_sumsq_diff_neg"].item() == pytest.approx((r - 1.0) ** 2)
    assert m["grpo_weight_sumsq_trrd"].item() == pytest.approx(r**2)
    assert m["grpo_weight_rel_diff_pos"].item() == pytest.approx(1.0)
    assert m["grpo_weight_cosine"].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)


def test_clamped_token_weight_is_alpha_times_ratio():
    """At the clamp the teacher term passes no gradient: weight alpha * e^{(1-alpha) c} A, not e^{(1-alpha) c} A."""
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    w = surrogate_weights(old, old, old - 3.0, adv, mask, alpha=0.5, eps_low=0.2, eps_high=0.28, teacher_clamp=1.0,
                          agg="token-mean")
    assert float(w) == pytest.approx(-0.5 * math.exp(0.5))
    d = trrd_vs_grpo(old, old, old - 3.0, adv, mask, alpha=0.5)
    assert float(d["diff_share_clamped"]) == pytest.approx(1.0) and float(d["clamped_frac"]) == 1.0
    assert float(d["rel_diff"]) == pytest.approx(1.0 - 0.5 * math.exp(0.5))  # |-0.5 e^0.5 - (-1)| / 1
    assert float(d["weight_ratio_mean"]) == pytest.approx(0.5 * math.exp(0.5))


def test_shares_sum_to_one_and_sums_add_up():
    logp, old, teacher, adv, mask = _batch(2)
    d = trrd_vs_grpo(logp, old, teacher, adv, mask, alpha=0.5)
    s = sum(float(d[k]) for k in ("diff_share_gated", "diff_share_clamped", "diff_share_rescaled"))
    assert s == pytest.approx(1.0)
    assert float(d["sumsq_diff"]) == pytest.approx(float(d["sumsq_diff_pos"] + d["sumsq_diff_neg"]))
    assert float(d["sumsq_grpo"]) == pytest.approx(float(d["sumsq_grpo_pos"] + d["sumsq_grpo_neg"]))
    assert float(d["rel_diff"]) == pytest.approx(math.sqrt(float(d["sumsq_diff"] / d["sumsq_grpo"])))
    assert 0 < float(d["rel_diff"]) and -1.0 <= float(d["cosine"]) <= 1.0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_trrd_loss_metrics_match_the_diagnostic(agg, dual_clip):
    logp, old, teacher, adv, mask = _batch(3)
    kw = dict(alpha=0.4, teacher_clamp=0.9, agg=agg, dual_clip=dual_clip)
    _, m = trrd_loss(logp.clone().requires_grad_(True), old, teacher, adv, mask, **kw)
    d = trrd_vs_grpo(logp, old, teacher, adv, mask, **kw)
    for k in [*SUMS, "rel_diff", "rel_diff_pos", "rel_diff_neg", "cosine"]:
        v = m[f"grpo_weight_{k}"]
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad, k
        assert v.item() == pytest.approx(float(d[k]), rel=1e-5), k
    assert 0 < m["grpo_weight_rel_diff"].item()


@pytest.mark.parametrize("agg", AGGS)
def test_pooled_sums_give_the_ratio_of_the_concatenated_batch(agg):
    """Means of the micro-batch sums (as step/update.py averages metrics) pool into the whole batch's ratios, which
    are those of the autograd gradients of the whole batch's losses."""
    logp, old, teacher, adv, mask = _batch(4)
    kw = dict(alpha=0.5, teacher_clamp=1.0, agg=agg)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]  # uneven token and sequence counts
    per_mb = [trrd_loss(logp[p].clone().requires_grad_(True), old[p], teacher[p], adv[p], mask[p], **kw)[1]
              for p in parts]
    means = {k: sum(m[f"grpo_weight_{k}"].double() for m in per_mb) / len(per_mb) for k in SUMS}
    pooled = pooled_ratios(means)
    x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    (g_t,) = torch.autograd.grad(trrd_loss(x, old, teacher, adv, mask, **kw)[0], x)
    (g_g,) = torch.autograd.grad(grpo_loss(y, old, adv, mask, agg=agg)[0], y)
    g_t, g_g = g_t[mask], g_g[mask]
    assert pooled["rel_diff"] == pytest.approx(float((g_t - g_g).norm() / g_g.norm()), rel=1e-5)
    assert pooled["cosine"] == pytest.approx(float(g_t @ g_g / (g_t.norm() * g_g.norm())), rel=1e-5)
    pos, neg = (adv[:, None].expand(mask.shape))[mask] > 0, (adv[:, None].expand(mask.shape))[mask] < 0
    for tag, sel in (("_pos", pos), ("_neg", neg)):
        want = float((g_t - g_g)[sel].norm() / g_g[sel].norm())
        assert pooled[f"rel_diff{tag}"] == pytest.approx(want, rel=1e-5), tag
    # a mean of the parts' own ratios is not the whole batch's ratio
    full = trrd_vs_grpo(logp, old, teacher, adv, mask, **kw)
    naive = [trrd_vs_grpo(logp[p], old[p], teacher[p], adv[p], mask[p], **kw) for p in parts]
    assert pooled["rel_diff"] == pytest.approx(float(full["rel_diff"]), rel=1e-5)
    naive_mean = sum(float(n["rel_diff"]) for n in naive) / len(naive)
    assert abs(naive_mean - float(full["rel_diff"])) > 1e-3


def test_undefined_ratios_are_left_out_so_means_stay_finite():
    """A micro-batch whose advantages are all 0 (one solved group) has no GRPO weight: sums 0, no ratio keys."""
    logp, old, teacher, adv, mask = _batch(5)
    _, m0 = trrd_loss(logp, old, teacher, torch.zeros_like(adv), mask, alpha=0.5)
    assert all(m0[f"grpo_weight_{k}"].item() == 0.0 for k in SUMS)
    assert not any(f"grpo_weight_{k}" in m0 for k in ("rel_diff", "rel_diff_pos", "rel_diff_neg", "cosine"))
    _, m1 = trrd_loss(logp, old, teacher, adv.abs(), mask, alpha=0.5)  # no A < 0 token: only _neg is undefined
    assert "grpo_weight_rel_diff_neg" not in m1 and m1["grpo_weight_rel_diff_pos"].item() > 0
    d = trrd_vs_grpo(logp, old, teacher, adv.abs(), mask, alpha=0.5)
    assert math.isnan(float(d["rel_diff_neg"]))  # the offline diagnostic says NaN instead
    rows = [m0, m1]  # step/update.py mean_metrics: each key averaged over the micro-batches that carry it
    mean = {k: sum(float(r[k]) for r in rows if k in r) / sum(k in r for r in rows) for k in {*m0, *m1}}
    assert all(math.isfinite(v) for v in mean.values())
    assert mean["grpo_weight_rel_diff"] == pytest.approx(m1["grpo_weight_rel_diff"].item())
