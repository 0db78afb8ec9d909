"""rlad_megatron.ops.logprobs: values vs an fp64 full-softmax reference, gradcheck, chunking, errors, TP=2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rlad_megatron.ops.logprobs import vocab_parallel_logprobs

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from logprobs_tp_worker import MaxAllocation


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_size: int):
    """fp64 log p(target) and entropy of softmax(logits[..., :vocab_size] / T)."""
    lp = torch.log_softmax(logits.double()[..., :vocab_size] / temperature, dim=-1)
    return lp.gather(-1, targets[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.5])
@pytest.mark.parametrize("vocab_size,chunk", [(50, 4096), (43, 7), (43, 1)])
def test_matches_fp64_reference(temperature, vocab_size, chunk):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(33, 50, generator=g)
    targets = torch.randint(0, vocab_size, (33,), generator=g)
    lp, h = vocab_parallel_logprobs(logits, targets, temperature=temperature, vocab_size=vocab_size,
                                    chunk_size=chunk, with_entropy=True)
    ref_lp, ref_h = reference(logits, targets, temperature, vocab_size)
    assert lp.dtype == h.dtype == torch.float32 and lp.shape == h.shape == (33,)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-6, atol=1e-5)


def test_batched_shape_and_no_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 20, generator=g)
    targets = torch.randint(0, 20, (3, 5), generator=g)
    lp, h = vocab_parallel_logprobs(logits, targets, chunk_size=4)
    assert h is None and lp.shape == (3, 5)
    torch.testing.assert_close(lp.double(), reference(logits, targets, 1.0, 20)[0])
    empty, _ = vocab_parallel_logprobs(torch.randn(0, 20), torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert empty.shape == (0,)


def test_bf16_input_stays_bf16_and_upcasts():
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(17, 40, generator=g)).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 37, (17,), generator=g)
    lp, h = vocab_parallel_logprobs(logits, targets, vocab_size=37, temperature=0.8, chunk_size=5,
                                    with_entropy=True)
    assert lp.dtype == torch.float32
    ref_lp, ref_h = reference(logits.detach(), targets, 0.8, 37)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-6, atol=1e-5)
    (lp + h).sum().backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("temperature,vocab_size,chunk", [(1.0, 12, 3), (0.7, 9, 4), (1.3, 12, 100)])
def test_gradcheck(temperature, vocab_size, chunk):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 12, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab_size, (7,), generator=g)
    kw = {"temperature": temperature, "vocab_size": vocab_size, "chunk_size": chunk}
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_logprobs(a, targets, with_entropy=True, **kw), (x,))
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_logprobs(a, targets, with_entropy=True, **kw)[1], (x,))
    assert torch.autograd.gradcheck(lambda a: vocab_parallel_logprobs(a, targets, **kw)[0], (x,))


def test_gradient_matches_autograd_reference_and_padding_gets_none():
    g = torch.Generator().manual_seed(4)
    x = 3 * torch.randn(21, 30, generator=g)
    targets = torch.randint(0, 26, (21,), generator=g)
    w1, w2 = torch.randn(21, generator=g), torch.randn(21, generator=g)
    a = x.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs(a, targets, vocab_size=26, temperature=0.9, chunk_size=6, with_entropy=True)
    (w1 * lp + w2 * h).sum().backward()
    b = x.double().requires_grad_(True)
    ref_lp, ref_h = reference(b, targets, 0.9, 26)
    (w1.double() * ref_lp + w2.double() * ref_h).sum().backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.grad[:, 26:], torch.zeros(21, 4))


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradient_keeps_fp32_accuracy_for_large_logits(scale, with_entropy):
    """fp32 logits of magnitude up to 1e4: the gradient of log p (and H) matches fp64 log_softmax on the same fp32
    inputs to ~1e-6 relative (max error / max gradient), like fp32 log_softmax; a single fp32 lse gave ~1e-4."""
    g = torch.Generator().manual_seed(2)
    logits = (scale + 5 * torch.randn(48, 300, generator=g, dtype=torch.float64)).float().requires_grad_()
    targets = torch.randint(0, 300, (48,), generator=g)
    g_lp, g_h = torch.randn(48, generator=g, dtype=torch.float64), torch.randn(48, generator=g, dtype=torch.float64)
    lp, h = vocab_parallel_logprobs(logits, targets, temperature=1.0, chunk_size=16, with_entropy=with_entropy)
    loss = (lp.double() * g_lp).sum() + ((h.double() * g_h).sum() if with_entropy else 0.0)
    loss.backward()
    ref_in = logits.detach().double().requires_grad_()
    ref_lp, ref_h = reference(ref_in, targets, 1.0, 300)
    ((ref_lp * g_lp).sum() + ((ref_h * g_h).sum() if with_entropy else 0.0)).backward()
    rel = ((logits.grad.double() - ref_in.grad).abs().max() / ref_in.grad.abs().max()).item()
    assert rel < 2e-6, rel


def test_does_not_modify_logits_in_place():
    x = torch.randn(9, 16, requires_grad=True)
    before = x.detach().clone()
    lp, h = vocab_parallel_logprobs(x, torch.randint(0, 16, (9,)), with_entropy=True, chunk_size=4)
    (lp.sum() + h.sum()).backward()
    assert torch.equal(x.detach(), before)


def test_nan_logits_of_a_masked_token_do_not_reach_other_gradients():
    x = torch.randn(2, 4, 16)
    x[1, 3, 5] = float("nan")  # e.g. a padding position
    x.requires_grad_(True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    lp, h = vocab_parallel_logprobs(x, torch.randint(0, 16, (2, 4)), with_entropy=True, chunk_size=3)
    assert torch.isnan(lp[1, 3]) and torch.isfinite(lp[mask]).all()
    torch.where(mask, lp + h, 0.0).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1, 3] == 0).all() and (x.grad[0] != 0).any()


def test_working_set_is_bounded_by_chunk():
    x = torch.randn(64, 80, requires_grad=True)
    mode = MaxAllocation(allow=(torch.ops.aten.empty_like.default,))  # the gradient buffer itself
    with mode:
        lp, h = vocab_parallel_logprobs(x, torch.randint(0, 77, (64,)), vocab_size=77, chunk_size=8,
                                        with_entropy=True)
        (lp + h).sum().backward()
    assert 0 < mode.max_numel <= 8 * 80, (mode.max_op, mode.max_numel)


@pytest.mark.parametrize("kwargs,targets,match", [
    ({"vocab_size": 10}, [0, 10], "targets must be token ids"),
    ({}, [0, -1], "targets must be token ids"),
    ({"vocab_size": 13}, [0, 1], "vocab_size"),
    ({"vocab_size": 0}, [0, 1], "vocab_size"),
    ({"temperature": 0.0}, [0, 1], "temperature"),
    ({"temperature": float("nan")}, [0, 1], "temperature"),
    ({"chunk_size": 0}, [0, 1], "chunk_size"),
    ({}, [0, 1, 2], "targets shape"),
])
def test_bad_inputs(kwargs, targets, match):
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(torch.randn(2, 12), torch.tensor(targets), **kwargs)


def test_float_targets_rejected():
    with pytest.raises(ValueError, match="targets must be integer"):
        vocab_parallel_logprobs(torch.randn(2, 12), torch.tensor([0.0, 1.0]))


@pytest.mark.slow
def test_tp2_matches_tp1(torchrun):
    """TP=2 (WORLD, new_group, singleton groups, Megatron's TP group) vs TP=1: values and gradients."""
    out = torchrun(DIST / "logprobs_tp_worker.py", nproc=2, timeout=300)
    assert "ALL OK" in out
