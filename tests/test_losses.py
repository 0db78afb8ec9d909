"""rlad_megatron.losses: TRRD/GRPO, KDRL, SFT, KL estimators, aggregation, GKD, input validation."""

from __future__ import annotations

import math

import pytest
import torch

from rlad_megatron.losses import (
    aggregate,
    gkd_loss,
    grpo_loss,
    kdrl_loss,
    kl_estimate,
    sft_loss,
    trrd_loss,
    vocab_parallel_divergence,
)

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def rollout(seed: int = 0, b: int = 6, n: int = 9, spread: float = 0.4):
    """Random ``[b, n]`` log-probs (student near old, teacher further off), ``[b]`` advantages, ragged mask."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, n, generator=g, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(b, n, generator=g, dtype=torch.float64)
    teacher = logp + 1.5 * torch.randn(b, n, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    mask = torch.arange(n)[None, :] < lengths[:, None]
    return logp, old, teacher, adv, mask


def plain_grpo(logp, old, adv, mask, eps_low, eps_high, agg):
    """Independent textbook GRPO: -min(r A, clip(r) A), masked means written out with explicit loops."""
    ratio = torch.exp(logp - old)
    a = adv[:, None].expand_as(logp)
    surr = torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    per_tok = -surr
    if agg == "token-mean":
        return per_tok[mask].sum() / mask.sum()
    seq = []
    for i in range(logp.shape[0]):
        row = per_tok[i][mask[i]]
        if row.numel():
            seq.append(row.mean() if agg == "seq-mean-token-mean" else row.sum())
    return torch.stack(seq).mean()


# ---------------------------------------------------------------------------------------------- TRRD / GRPO


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("with_teacher", [False, True])
def test_alpha_one_is_grpo(agg, with_teacher):
    logp, old, teacher, adv, mask = rollout(1)
    x = logp.clone().requires_grad_(True)
    loss, m = trrd_loss(x, old, teacher if with_teacher else None, adv, mask, alpha=1.0, agg=agg)
    loss.backward()
    y = logp.clone().requires_grad_(True)
    ref = plain_grpo(y, old, adv, mask, 0.2, 0.28, agg)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=0)
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0  # the example exercises both clips
    z = logp.clone().requires_grad_(True)
    loss2, _ = grpo_loss(z, old, adv, mask, agg=agg)
    loss2.backward()
    assert torch.equal(loss2, loss) and torch.equal(z.grad, x.grad)
    if with_teacher:
        assert m["gate_blocked_pos"] == m["gate_blocked_neg"] == m["gate_enabled_pos"] == m["gate_enabled_neg"] == 0


def test_trrd_matches_formula_and_gradient():
    logp, old, teacher, adv, mask = rollout(2)
    alpha, c = 0.3, 0.8
    x = logp.clone().requires_grad_(True)
    loss, _ = trrd_loss(x, old, teacher, adv, mask, alpha=alpha, teacher_clamp=c, agg="token-mean")
    loss.backward()
    y = logp.clone().requires_grad_(True)
    log_r = alpha * (y - old) + (1 - alpha) * torch.clamp(y - teacher, -c, c)
    r, a = torch.exp(log_r), adv[:, None].expand_as(y)
    ref = -torch.min(r * a, torch.clamp(r, 0.8, 1.28) * a)[mask].mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-15)


def test_teacher_clamp_scales_gradient_to_alpha():
    """One token, clamp active: d loss / d logp = -A r alpha (the teacher factor is constant)."""
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old, teacher = torch.tensor([[-1.05]], dtype=torch.float64), torch.tensor([[-3.0]], dtype=torch.float64)
    adv, mask = torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    loss, m = trrd_loss(logp, old, teacher, adv, mask, alpha=0.5, teacher_clamp=1.0, eps_high=1.0)
    loss.backward()
    r = math.exp(0.5 * 0.05 + 0.5 * 1.0)
    assert loss.item() == pytest.approx(r)
    assert logp.grad.item() == pytest.approx(0.5 * r)
    assert m["teacher_clamp_frac"] == 1.0 and m["log_ratio_teacher_mean"].item() == pytest.approx(2.0)


def gate_batch():
    """Six hand-built tokens (alpha=0.5, eps 0.2/0.28, clamp 1), one per row; see test_gating_metrics."""
    d_old = torch.tensor([0.0, 0.4, 0.0, -0.4, 0.0, 0.5], dtype=torch.float64)  # logp - old_logp
    d_t = torch.tensor([1.2, -0.6, -1.5, 0.6, 0.0, 0.3], dtype=torch.float64)  # logp - teacher_logp
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    logp = torch.full((6, 1), -2.0, dtype=torch.float64)
    return logp, logp - d_old[:, None], logp - d_t[:, None], adv, torch.ones(6, 1, dtype=torch.bool)


def test_gating_metrics_hand_built():
    """Row 0: A>0, teacher dislikes the token (log r = 0.5 > log 1.28) -> blocked+.
    Row 1: A>0, GRPO ratio e^.4 clipped, teacher likes it (log r = -0.1) -> enabled+.
    Row 2: A<0, teacher likes it (log r = -0.5 < log 0.8) -> blocked- (protected from being pushed down).
    Row 3: A<0, GRPO ratio e^-.4 clipped, teacher dislikes it (log r = 0.1) -> enabled-.
    Row 4: A>0, all equal -> alive in both.  Row 5: A = 0 (ratio e^.4 > 1.28 but no clip counted)."""
    logp, old, teacher, adv, mask = gate_batch()
    x = logp.clone().requires_grad_(True)
    loss, m = trrd_loss(x, old, teacher, adv, mask, alpha=0.5, teacher_clamp=1.0, agg="token-mean")
    loss.backward()
    sixth = pytest.approx(1 / 6)
    for k in ("gate_blocked_pos", "gate_blocked_neg", "gate_enabled_pos", "gate_enabled_neg", "zero_adv_frac",
              "clip_frac_low", "clip_frac_high"):
        assert m[k].item() == sixth, k
    assert m["teacher_clamp_frac"].item() == pytest.approx(2 / 6)
    assert m["adv_pos_frac"].item() == pytest.approx(3 / 6) and m["adv_neg_frac"].item() == pytest.approx(2 / 6)
    assert m["log_ratio_old_mean"].item() == pytest.approx(0.5 / 6)
    assert m["log_ratio_teacher_mean"].item() == pytest.approx((1.2 - 0.6 - 1.5 + 0.6 + 0.3) / 6)
    alive = x.grad[:, 0] != 0
    assert alive.tolist() == [False, True, False, True, True, False]


def test_gates_agree_with_gradients_on_random_batches():
    """#tokens with a gradient under TRRD = under GRPO - blocked + enabled (alpha=0 exercises clamp-kills)."""
    for seed, alpha in [(3, 0.5), (4, 0.0), (5, 0.8)]:
        logp, old, teacher, adv, mask = rollout(seed, b=16, n=12)
        adv = torch.where(torch.rand(16, generator=torch.Generator().manual_seed(seed)) < 0.2, 0.0, adv)
        x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        loss, m = trrd_loss(x, old, teacher, adv, mask, alpha=alpha, agg="token-mean")
        loss.backward()
        grpo_loss(y, old, adv, mask, agg="token-mean")[0].backward()
        n = mask.sum()
        live_t, live_g = ((x.grad != 0) & mask).sum() / n, ((y.grad != 0) & mask).sum() / n
        gates = sum(m[f"gate_{k}"] for k in ("enabled_pos", "enabled_neg")) - sum(
            m[f"gate_{k}"] for k in ("blocked_pos", "blocked_neg"))
        assert live_t.item() == pytest.approx(live_g.item() + gates.item()), (seed, alpha)
        assert m["gate_blocked_pos"] + m["gate_blocked_neg"] + m["gate_enabled_pos"] + m["gate_enabled_neg"] > 0


def test_dual_clip_caps_negative_advantage_tokens():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-2.0, -2.0]], dtype=torch.float64)  # r = e^2 = 7.39 > 3
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = grpo_loss(logp, old, adv, mask, dual_clip=3.0, agg="token-mean")
    loss.backward()
    assert loss.item() == pytest.approx((3.0 - 1.28) / 2)  # A<0 capped at -cA = 3; A>0 clipped at 1.28
    assert logp.grad.tolist() == [[0.0, 0.0]]
    assert m["dual_clip_frac"].item() == 0.5 and m["clip_frac_high"].item() == 0.5
    no_dual, _ = grpo_loss(logp, old, adv, mask, agg="token-mean")
    assert no_dual.item() == pytest.approx((math.exp(2) - 1.28) / 2)


def test_masked_nan_does_not_leak():
    logp, old, teacher, adv, mask = rollout(6)
    bad = ~mask
    assert bad.any()
    x = torch.where(bad, float("nan"), logp).requires_grad_(True)
    t = torch.where(bad, float("-inf"), teacher)
    o = torch.where(bad, float("inf"), old)
    loss, m = trrd_loss(x, o, t, adv, mask, ref_logp=torch.where(bad, float("nan"), old), beta=0.1)
    loss.backward()
    y = logp.clone().requires_grad_(True)
    ref, _ = trrd_loss(y, old, teacher, adv, mask, ref_logp=old, beta=0.1)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, y.grad)
    assert all(torch.isfinite(v).all() for v in m.values())


def test_ratio_overflow_is_an_error_not_a_nan():
    logp, old = torch.zeros(1, 2), torch.tensor([[-100.0, 0.0]])  # r = e^100 overflows fp32
    with pytest.raises(ValueError, match="overflows exp"):
        grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))


def test_reference_kl_term():
    logp, old, teacher, adv, mask = rollout(7)
    ref_logp = old - 0.3
    with pytest.raises(ValueError, match="k1.*cannot be a loss term"):
        trrd_loss(logp, old, teacher, adv, mask, beta=0.05, ref_logp=ref_logp, kl_estimator="k1")
    for est in ("k2", "k3"):
        loss, m = trrd_loss(logp, old, teacher, adv, mask, beta=0.05, ref_logp=ref_logp, kl_estimator=est)
        pg, _ = trrd_loss(logp, old, teacher, adv, mask)
        k = kl_estimate(logp, ref_logp, est)
        torch.testing.assert_close(loss, pg + 0.05 * aggregate(k, mask, "seq-mean-token-mean"))
        torch.testing.assert_close(m["kl_ref"], k[mask].mean().float())


# ------------------------------------------------------------------------------------------- KL, KDRL, SFT


def test_kl_estimators_match_formulas():
    lp = torch.tensor([-0.5, -2.0, -0.1], dtype=torch.float64)
    ref = torch.tensor([-1.0, -0.5, -0.1], dtype=torch.float64)
    lr = lp - ref
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), lr)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), 0.5 * lr**2)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.exp(-lr) - 1 + lr)
    assert kl_estimate(lp, ref, "k3")[2] == 0.0


def test_k1_k3_are_unbiased_for_reverse_kl():
    """E_{v ~ p}[k(log p_v - log q_v)] = KL(p || q) exactly for k1 and k3 (expectation over the full support)."""
    g = torch.Generator().manual_seed(8)
    lp, lq = torch.log_softmax(torch.randn(20, generator=g, dtype=torch.float64), 0), torch.log_softmax(
        torch.randn(20, generator=g, dtype=torch.float64), 0)
    kl = (lp.exp() * (lp - lq)).sum()
    for est in ("k1", "k3"):
        torch.testing.assert_close((lp.exp() * kl_estimate(lp, lq, est)).sum(), kl)


def test_kl_estimator_expected_gradients():
    """Exactly over a small categorical pi = softmax(theta) and a fixed ref: E_{y~pi}[grad k(y)] (the sample fixed,
    the gradient through log pi(y)) is 0 for k1, grad KL(pi||ref) for k2, grad KL(ref||pi) for k3."""
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(7, generator=g, dtype=torch.float64)
    log_ref = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)

    def grad(fn) -> torch.Tensor:
        theta = theta0.clone().requires_grad_(True)
        fn(torch.log_softmax(theta, 0)).backward()
        return theta.grad

    pi = torch.softmax(theta0, 0)
    expected = {est: grad(lambda lp, e=est: (pi * kl_estimate(lp, log_ref, e)).sum()) for est in ("k1", "k2", "k3")}
    reverse = grad(lambda lp: (lp.exp() * (lp - log_ref)).sum())
    forward = grad(lambda lp: (log_ref.exp() * (log_ref - lp)).sum())
    assert reverse.abs().max() > 0.05 and forward.abs().max() > 0.05 and (reverse - forward).abs().max() > 0.05
    torch.testing.assert_close(expected["k1"], torch.zeros_like(theta0), atol=1e-12, rtol=0)
    torch.testing.assert_close(expected["k2"], reverse, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(expected["k3"], forward, atol=1e-12, rtol=1e-10)


def test_k1_is_refused_as_a_loss_term():
    logp, old, teacher, adv, mask = rollout(9)
    with pytest.raises(ValueError, match="zero in expectation"):
        kdrl_loss(logp, old, teacher, adv, mask, kl_coef=0.02, kl_estimator="k1")


@pytest.mark.parametrize("est", ["k2", "k3"])
def test_kdrl_is_grpo_plus_kl(est):
    logp, old, teacher, adv, mask = rollout(9)
    x, y = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss, m = kdrl_loss(x, old, teacher, adv, mask, kl_coef=0.02, kl_estimator=est, agg="token-mean")
    loss.backward()
    lr = y - teacher
    kl = {"k2": 0.5 * lr**2, "k3": torch.exp(-lr) - 1 + lr}[est]
    ref = plain_grpo(y, old, adv, mask, 0.2, 0.28, "token-mean") + 0.02 * kl[mask].mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(m["kl_teacher"], kl[mask].mean().float().detach())


def test_aggregation_modes_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 2 is empty: left out
    assert aggregate(v, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)


def test_sft_loss():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, m = sft_loss(logp, mask)
    assert loss.item() == pytest.approx(4.5 / 5) and m["num_tokens"].item() == 5
    loss, _ = sft_loss(logp, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((1.5 + 0.5) / 2)


# ------------------------------------------------------------------------------------------------- GKD


def gkd_reference(s, t, divergence, beta, temperature, vocab_size):
    """Dense fp64 reference; JSD as in TRL's generalized_jsd_loss (logsumexp mixture)."""
    ls = torch.log_softmax(s.double()[..., :vocab_size] / temperature, -1)
    lt = torch.log_softmax(t.double()[..., :vocab_size] / temperature, -1)
    if divergence == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if divergence == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    b = torch.tensor(beta, dtype=torch.float64)
    mix = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)
    return b * (lt.exp() * (lt - mix)).sum(-1) + (1 - b) * (ls.exp() * (ls - mix)).sum(-1)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature,vocab_size,chunk", [(1.0, 30, 4096), (0.7, 26, 5)])
def test_gkd_divergences(divergence, temperature, vocab_size, chunk):
    g = torch.Generator().manual_seed(10)
    s, t = 2 * torch.randn(4, 6, 30, generator=g), 2 * torch.randn(4, 6, 30, generator=g)
    x = s.clone().requires_grad_(True)
    out = vocab_parallel_divergence(x, t, divergence=divergence, beta=0.3, temperature=temperature,
                                    vocab_size=vocab_size, chunk_size=chunk)
    assert out.shape == (4, 6) and (out >= -1e-6).all()
    y = s.double().requires_grad_(True)
    ref = gkd_reference(y, t, divergence, 0.3, temperature, vocab_size)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    w = torch.randn(4, 6, generator=g)
    (w * out).sum().backward()
    (w.double() * ref).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(x.grad[..., vocab_size:], torch.zeros_like(x.grad[..., vocab_size:]))


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_gkd_gradcheck_and_zero_at_equal(divergence):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 10, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(5, 10, dtype=torch.float64, generator=g)
    kw = {"divergence": divergence, "beta": 0.7, "temperature": 1.2, "vocab_size": 8, "chunk_size": 2}
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_divergence(a, t, **kw), (x,))
    same = vocab_parallel_divergence(x.detach(), x.detach() + 5.0, **kw)  # shift-invariant softmax
    torch.testing.assert_close(same, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gkd_loss_aggregates_and_teacher_is_constant():
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(3, 4, 16, generator=g, requires_grad=True), torch.randn(3, 4, 16, generator=g,
                                                                                requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    loss, m = gkd_loss(s, t, mask, divergence="reverse", agg="seq-mean-token-mean")
    per_tok = vocab_parallel_divergence(s, t, divergence="reverse")
    torch.testing.assert_close(loss, aggregate(per_tok, mask.bool(), "seq-mean-token-mean"))
    loss.backward()
    assert t.grad is None and s.grad is not None and m["num_tokens"].item() == 7


# ---------------------------------------------------------------------------------------------- bad inputs


def _good():
    logp, old, teacher, adv, mask = rollout(13, b=2, n=3)
    return {"logp": logp, "old_logp": old, "teacher_logp": teacher, "advantages": adv, "mask": mask}


def _nan_at_unmasked(name):
    def f(d):
        x = d[name].clone()
        x.view(-1)[0] = float("nan") if name != "teacher_logp" else float("-inf")
        d[name] = x
    return f


@pytest.mark.parametrize("edit,kwargs,match", [
    (lambda d: d.update(old_logp=d["old_logp"][:, :2]), {}, "old_logp shape"),
    (lambda d: d.update(mask=torch.zeros(2, 3, dtype=torch.bool)), {}, "mask selects no tokens"),
    (lambda d: d.update(mask=torch.full((2, 3), 2)), {}, "mask must hold only 0/1"),
    (lambda d: d.update(mask=torch.ones(3, dtype=torch.bool)), {}, r"mask must be a \[batch, resp_len\]"),
    (_nan_at_unmasked("logp"), {}, "logp has 1 non-finite"),
    (_nan_at_unmasked("old_logp"), {}, "old_logp has 1 non-finite"),
    (_nan_at_unmasked("teacher_logp"), {}, "teacher_logp has 1 non-finite"),
    (_nan_at_unmasked("advantages"), {}, "advantages has"),
    (lambda d: d.update(advantages=torch.zeros(3, dtype=torch.float64)), {}, "advantages shape"),
    (lambda d: d.update(teacher_logp=None), {}, "teacher_logp is required"),
    (None, {"agg": "sum"}, "agg must be one of"),
    (None, {"alpha": 1.5}, r"alpha must be in \[0.0, 1.0\]"),
    (None, {"alpha": -0.1}, "alpha must be"),
    (None, {"alpha": float("nan")}, "alpha must be"),
    (None, {"kl_estimator": "k4"}, "kl_estimator must be one of"),
    (None, {"beta": 0.1}, "ref_logp is required"),
    (None, {"beta": 0.1, "ref_logp": torch.full((2, 3), float("nan"), dtype=torch.float64)}, "ref_logp has"),
    (None, {"eps_low": 1.0}, "eps_low"),
    (None, {"eps_high": -0.1}, "eps_high"),
    (None, {"dual_clip": 1.0}, "dual_clip"),
    (None, {"teacher_clamp": 0.0}, "teacher_clamp"),
])
def test_trrd_bad_inputs(edit, kwargs, match):
    d = _good()
    if edit is not None:
        edit(d)
    with pytest.raises(ValueError, match=match):
        trrd_loss(d["logp"], d["old_logp"], d["teacher_logp"], d["advantages"], d["mask"], **kwargs)


def test_other_losses_bad_inputs():
    d = _good()
    args = (d["logp"], d["old_logp"], d["teacher_logp"], d["advantages"], d["mask"])
    with pytest.raises(ValueError, match="kl_estimator"):
        kdrl_loss(*args, kl_coef=0.1, kl_estimator="k5")
    with pytest.raises(ValueError, match="kl_coef"):
        kdrl_loss(*args, kl_coef=-1.0)
    with pytest.raises(ValueError, match="teacher_logp has"):
        kdrl_loss(d["logp"], d["old_logp"], torch.full((2, 3), float("nan"), dtype=torch.float64),
                  d["advantages"], d["mask"], kl_coef=0.1)
    with pytest.raises(ValueError, match="agg"):
        sft_loss(d["logp"], d["mask"], agg="mean")
    with pytest.raises(ValueError, match="logp has"):
        sft_loss(torch.full((2, 3), float("inf")), d["mask"])
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(d["logp"], d["old_logp"], "low_var")
    s = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="divergence must be one of"):
        vocab_parallel_divergence(s, s, divergence="tvd")
    with pytest.raises(ValueError, match="beta"):
        vocab_parallel_divergence(s, s, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        vocab_parallel_divergence(s, s[..., :4])
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_divergence(s, s, vocab_size=9)
    with pytest.raises(ValueError, match="mask shape"):
        gkd_loss(s, s, torch.ones(3, 2))
    nan = s.clone()
    nan[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite at 1 unmasked"):
        gkd_loss(nan, s, torch.ones(2, 3))
    mask = torch.ones(2, 3)
    mask[1, 2] = 0
    x = nan.clone().requires_grad_(True)
    loss, _ = gkd_loss(x, s, mask)  # NaN only at a masked position: ignored in the value and the gradient
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and (x.grad[1, 2] == 0).all()
