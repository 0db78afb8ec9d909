"""`ops.output_logprobs` at TP=1 (one process); TP=2 runs in tests/test_packing_dist.py."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
from rlad_megatron.ops.output_logprobs import output_logprobs

N, H, V, VOCAB, T = 37, 16, 50, 45, 0.7  # padded vocab: rows 45..49 are padding


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (0.7 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype)
    w[VOCAB:] = 30.0  # padding rows that would dominate the softmax if they were not masked
    targets = torch.randint(0, VOCAB, (N,), generator=g)
    g1, g2 = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    g1[:4] = 0.0
    g2[:4] = 0.0
    return x, w, targets, g1, g2


def run(fn, x, w, g1, g2, use_ent=True):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fn(x, w)
    loss = (lp * g1.to(lp.dtype)).sum() + ((ent * g2.to(lp.dtype)).sum() if use_ent else 0.0)
    loss.backward()
    return lp, ent, x.grad, w.grad


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("tiles", [(4096, 4096), (8, 7), (1, 50), (37, 1)])
def test_matches_logits_path(tiles):
    x, w, t, g1, g2 = inputs()
    ref = run(lambda x, w: vocab_parallel_logprobs(x @ w.t(), t, temperature=T, vocab_size=VOCAB, with_entropy=True),
              x, w, g1, g2)
    got = run(lambda x, w: output_logprobs(x, w, t, temperature=T, vocab_size=VOCAB, with_entropy=True,
                                           token_chunk=tiles[0], vocab_chunk=tiles[1]), x, w, g1, g2)
    for name, a, b in zip(("logp", "ent", "dx", "dw"), got, ref, strict=True):
        assert rel(a, b) < 2e-6, (name, rel(a, b))
    assert got[3][VOCAB:].abs().max() == 0.0, "padding rows got a gradient"
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)


def test_gradcheck_fp64():
    x, w, t, _, _ = inputs(torch.float64)
    x, w = x[:6, :5].clone().requires_grad_(), w[:9, :5].clone().requires_grad_()
    t = t[:6] % 8

    def f(x, w):
        return output_logprobs(x, w, t, temperature=T, vocab_size=8, with_entropy=True, token_chunk=4, vocab_chunk=3)

    assert torch.autograd.gradcheck(f, (x, w))


def test_only_logp_grad_and_frozen_weight():
    x, w, t, g1, g2 = inputs()
    ref = run(lambda x, w: vocab_parallel_logprobs(x @ w.t(), t, vocab_size=VOCAB, with_entropy=True),
              x, w, g1, g2, use_ent=False)
    got = run(lambda x, w: output_logprobs(x, w, t, vocab_size=VOCAB, with_entropy=True, token_chunk=5,
                                           vocab_chunk=9), x, w, g1, g2, use_ent=False)
    assert rel(got[2], ref[2]) < 2e-6 and rel(got[3], ref[3]) < 2e-6
    xr = x.clone().requires_grad_()
    lp, ent = output_logprobs(xr, w, t, vocab_size=VOCAB)  # a frozen weight (teacher): no weight gradient
    assert ent is None
    lp.sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_no_grad_scoring_and_leading_dims():
    x, w, t, _, _ = inputs()
    with torch.no_grad():
        lp, ent = output_logprobs(x.view(1, N, H), w, t.view(1, N), vocab_size=VOCAB, with_entropy=True)
    ref, ref_ent = vocab_parallel_logprobs(x @ w.t(), t, vocab_size=VOCAB, with_entropy=True)
    assert lp.shape == (1, N) and not lp.requires_grad
    assert rel(lp[0], ref) < 2e-6 and rel(ent[0], ref_ent) < 2e-6
    empty, _ = output_logprobs(x[:0], w, t[:0], vocab_size=VOCAB)
    assert empty.shape == (0,)


def test_bf16_inputs_compute_in_fp32():
    x, w, t, g1, g2 = inputs()
    xb, wb = x.bfloat16(), w.bfloat16()

    def fused(x, w):
        return output_logprobs(x, w, t, temperature=T, vocab_size=VOCAB, with_entropy=True, token_chunk=8,
                               vocab_chunk=16)

    ref = run(fused, xb.double(), wb.double(), g1, g2)  # exact math on the same (bf16-rounded) inputs
    got = run(fused, xb, wb, g1, g2)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert rel(got[0], ref[0]) < 1e-6 and rel(got[1], ref[1]) < 1e-6
    assert rel(got[2], ref[2]) < 8e-3 and rel(got[3], ref[3]) < 8e-3  # one bf16 rounding of the gradients


def test_errors():
    x, w, t, _, _ = inputs()
    with pytest.raises(ValueError, match="targets shape"):
        output_logprobs(x, w, t[:-1])
    with pytest.raises(ValueError, match=r"weight must be \[vocab/tp, h=16\] in the hidden dtype"):
        output_logprobs(x, w.double(), t)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, vocab_size=45\)"):
        output_logprobs(x, w, t + VOCAB, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        output_logprobs(x, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        output_logprobs(x, w, t, vocab_size=V + 1)
