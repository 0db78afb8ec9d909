"""`ops.output_loss` at TP=1 (one process): a per-token loss differentiated in the forward pass equals the same loss
on `output_logprobs` / the logits path (value, log-probs, entropy, gradients); TP=2 runs in
tests/test_packing_dist.py."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
from rlad_megatron.ops.output_loss import output_loss
from tests.test_output_logprobs import VOCAB, N, T  # same shapes: rows >= VOCAB of the weight are padding
from tests.test_output_logprobs import inputs as logprob_inputs


def inputs(dtype=torch.float32, seed=0):
    """The log-prob tests' hidden states, padded-vocab weight and targets, plus old log-probs and advantages."""
    x, w, targets, _, _ = logprob_inputs(dtype, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    old = torch.randn(N, generator=g, dtype=torch.float64) - 2.0
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    adv[:4] = 0.0  # tokens the loss ignores
    return x, w, targets, old, adv


def ppo_entropy_loss(old, adv, coef=0.05):
    """A clipped-ratio (PPO / GRPO) token loss with an entropy bonus: nonlinear in log p and H, a sum over tokens."""

    def loss(lp, ent):
        ratio = torch.exp(lp - old.to(lp.dtype))
        a = adv.to(lp.dtype)
        pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        value = pg.sum() / len(lp) - (coef * ent.sum() / len(lp) if ent is not None else 0.0)
        return value, {"clip": float(((ratio - 1).abs() > 0.2).float().mean())}

    return loss


def reference(x, w, t, loss_fn, with_entropy=True):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x @ w.t(), t, temperature=T, vocab_size=VOCAB, with_entropy=with_entropy)
    loss, aux = loss_fn(lp, ent)
    loss.backward()
    return loss, lp, ent, x.grad, w.grad, aux


def fused(x, w, t, loss_fn, with_entropy=True, **tiles):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, lp, ent, aux = output_loss(x, w, t, loss_fn, temperature=T, vocab_size=VOCAB, with_entropy=with_entropy,
                                     **tiles)
    loss.backward()
    return loss, lp, ent, x.grad, w.grad, aux


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("tiles", [(1024, 4096), (8, 7), (1, 50), (37, 1), (5, 45)])
def test_matches_the_logits_path(tiles):
    x, w, t, old, adv = inputs()
    loss_fn = ppo_entropy_loss(old, adv)
    ref = reference(x, w, t, loss_fn)
    got = fused(x, w, t, loss_fn, token_chunk=tiles[0], vocab_chunk=tiles[1])
    for name, a, b in zip(("loss", "logp", "ent", "dx", "dw"), got[:5], ref[:5], strict=True):
        assert rel(a, b) < 2e-6, (name, rel(a, b))
    assert got[5] == ref[5], "aux comes from the call that saw every token"
    assert got[4][VOCAB:].abs().max() == 0.0, "padding rows got a gradient"
    assert not got[1].requires_grad and got[1].dtype == torch.float32 and got[1].shape == (N,)


def test_without_entropy_and_upstream_scale():
    """No entropy: the loss sees None; the backward scales the stored gradients by the upstream gradient."""
    x, w, t, old, adv = inputs(seed=1)
    loss_fn = ppo_entropy_loss(old, adv, coef=0.0)
    ref = reference(x, w, t, loss_fn, with_entropy=False)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _, ent, _ = output_loss(xs, ws, t, loss_fn, temperature=T, vocab_size=VOCAB, token_chunk=6)
    (3.0 * loss).backward()
    assert ent is None
    assert rel(xs.grad, 3.0 * ref[3]) < 2e-6 and rel(ws.grad, 3.0 * ref[4]) < 2e-6 and rel(loss, ref[0]) < 2e-6


def test_frozen_weight_and_loss_without_gradient():
    x, w, t, old, adv = inputs(seed=2)
    loss_fn = ppo_entropy_loss(old, adv)
    ref = reference(x, w, t, loss_fn)
    xs = x.clone().requires_grad_()
    loss, *_ = output_loss(xs, w, t, loss_fn, temperature=T, vocab_size=VOCAB, with_entropy=True, token_chunk=9)
    loss.backward()
    assert rel(xs.grad, ref[3]) < 2e-6
    # a loss that does not depend on the log-probs: zero gradients, no NaN
    xs = x.clone().requires_grad_()
    loss, *_ = output_loss(xs, w, t, lambda lp, ent: (lp.new_tensor(1.5), None), vocab_size=VOCAB)
    loss.backward()
    assert float(loss) == 1.5 and xs.grad.abs().max() == 0.0


def test_gradcheck_fp64():
    x, w, t, old, adv = inputs(torch.float64)
    x, w = x[:6, :5].clone().requires_grad_(), w[:9, :5].clone().requires_grad_()
    t, old, adv = t[:6] % 8, old[:6], adv[:6]
    loss_fn = ppo_entropy_loss(old, adv)

    def f(x, w):
        return output_loss(x, w, t, loss_fn, temperature=T, vocab_size=8, with_entropy=True, token_chunk=4,
                           vocab_chunk=3)[0]

    assert torch.autograd.gradcheck(f, (x, w))


def test_bf16_inputs():
    x, w, t, old, adv = inputs()
    loss_fn = ppo_entropy_loss(old, adv)
    ref = reference(x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double(), t, loss_fn)
    got = fused(x.to(torch.bfloat16), w.to(torch.bfloat16), t, loss_fn, token_chunk=8, vocab_chunk=16)
    assert got[3].dtype == got[4].dtype == torch.bfloat16
    assert got[4][VOCAB:].abs().max() == 0.0, "padding rows got a gradient"
    for name, a, b in zip(("loss", "logp", "ent", "dx", "dw"), got[:5], ref[:5], strict=True):
        assert rel(a, b) < (1e-5 if name in ("loss", "logp", "ent") else 8e-3), (name, rel(a, b))


def test_errors():
    x, w, t, old, adv = inputs()
    loss_fn = ppo_entropy_loss(old, adv)
    with pytest.raises(ValueError, match="token ids"):
        output_loss(x, w, t + 100, loss_fn, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="hidden dtype"):
        output_loss(x, w.double(), t, loss_fn)
    with pytest.raises(ValueError, match="scalar loss"):
        output_loss(x, w, t, lambda lp, ent: (lp * 2, None), vocab_size=VOCAB)

