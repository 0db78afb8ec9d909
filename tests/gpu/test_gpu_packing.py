"""One GPU: the fused output-layer log-prob on CUDA GEMMs, and packed sequences (local mask path; THD with
Transformer Engine) vs the padded layout. Skips cleanly without CUDA (and the THD test without TE)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sequences(vocab: int, n: int = 9, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [int(v) for v in torch.randint(2, 120, (n,), generator=g)]
    return [torch.randint(0, vocab, (k,), generator=g) for k in lengths]


def _padded(seqs: list[torch.Tensor]) -> torch.Tensor:
    tok = torch.zeros(len(seqs), max(s.numel() for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        tok[i, :s.numel()] = s
    return tok


def _max_diff(per_seq: list[torch.Tensor], ref: torch.Tensor) -> float:
    return max(float((p - ref[i, :p.numel()]).abs().max()) for i, p in enumerate(per_seq) if p.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_cuda_matches_logits_path(megatron, dtype):
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.ops.output_logprobs import output_logprobs

    g = torch.Generator().manual_seed(0)
    n, h, v, vocab = 1000, 256, 4096, 4000
    x0 = torch.randn(n, h, generator=g).to("cuda", dtype)
    w0 = (0.1 * torch.randn(v, h, generator=g)).to("cuda", dtype)
    t = torch.randint(0, vocab, (n,), generator=g).cuda()
    gl, ge = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()
    res = []
    for fused in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            lp, ent = output_logprobs(x, w, t, temperature=0.7, vocab_size=vocab, with_entropy=True,
                                      token_chunk=384, vocab_chunk=1024)
        else:
            lp, ent = vocab_parallel_logprobs(x @ w.t(), t, temperature=0.7, vocab_size=vocab, with_entropy=True)
        ((lp * gl).sum() + (ent * ge).sum()).backward()
        res.append((lp.float(), ent.float(), x.grad.float(), w.grad.float()))
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2}[dtype]  # TF32 / bf16 GEMMs, different tilings
    for name, a, b in zip(("logp", "ent", "dx", "dw"), *res, strict=True):
        err = float((a - b).abs().max() / b.abs().max())
        print(f"\n[gpu fused op] {dtype} {name}: rel diff vs logits path {err:.2e}")
        assert err < tol, (name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_cuda_matches_logits_path(megatron, dtype):
    """`ops.output_loss` on CUDA (bf16 GEMMs, fp32 accumulators): a clipped-ratio loss + entropy bonus differentiated
    in the forward pass vs the same loss on the logits path."""
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.ops.output_loss import output_loss

    g = torch.Generator().manual_seed(1)
    n, h, v, vocab = 1000, 256, 4096, 4000
    x0 = torch.randn(n, h, generator=g).to("cuda", dtype)
    w0 = (0.1 * torch.randn(v, h, generator=g)).to("cuda", dtype)
    t = torch.randint(0, vocab, (n,), generator=g).cuda()
    old, adv = (torch.randn(n, generator=g) - 8.0).cuda(), torch.randn(n, generator=g).cuda()

    def loss_fn(lp, ent):
        ratio = torch.exp(lp - old)
        return (-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)).mean() - 0.01 * ent.mean(), None

    res = []
    for fused in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            loss, *_ = output_loss(x, w, t, loss_fn, temperature=0.7, vocab_size=vocab, with_entropy=True,
                                   token_chunk=384, vocab_chunk=1024)
        else:
            lp, ent = vocab_parallel_logprobs(x @ w.t(), t, temperature=0.7, vocab_size=vocab, with_entropy=True)
            loss, _ = loss_fn(lp, ent)
        loss.backward()
        res.append((loss.float(), x.grad.float(), w.grad.float()))
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2}[dtype]
    for name, a, b in zip(("loss", "dx", "dw"), *res, strict=True):
        err = float((a - b).abs().max() / b.abs().max())
        print(f"\n[gpu fused loss] {dtype} {name}: rel diff vs logits path {err:.2e}")
        assert err < tol, (name, err)


def _score_both(model, seqs):
    from rlad_megatron.models.forward import compute_logprobs
    from rlad_megatron.models.packed import score_packed

    ref, _ = compute_logprobs(model, _padded(seqs), micro_batch_size=3)
    packed, _ = score_packed(model, seqs, max_tokens_per_gpu=300, fused=True)
    return packed, ref


def test_local_spec_mask_packs_match_padded(megatron, tiny_hf_dir, kit):
    model = kit.build_student(tiny_hf_dir, dtype=torch.float32, use_te=False)
    packed, ref = _score_both(model, _sequences(kit.TINY["vocab_size"]))
    diff = _max_diff(packed, ref)
    print(f"\n[gpu packing] local spec fp32, mask packs vs padded: max |dlogp| {diff:.2e}")
    assert diff < 1e-4


def test_te_thd_packs_match_padded(megatron, tiny_hf_dir, kit):
    from rlad_megatron.models.builder import te_available
    from rlad_megatron.models.packed import packed_micro_batch, uses_te_attention

    if not te_available():
        pytest.skip("transformer_engine.pytorch is not importable (pip install -e .[gpu])")
    model = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=True)
    assert uses_te_attention(model)
    seqs = _sequences(kit.TINY["vocab_size"])
    mb = packed_micro_batch(model, seqs[:3])
    assert mb.tokens.shape[1] % 128 == 0 and mb.packed_seq_params is not None and mb.attention_mask is None
    packed, ref = _score_both(model, seqs)
    diff = _max_diff(packed, ref)
    print(f"\n[gpu packing] TE bf16, THD packs vs padded: max |dlogp| {diff:.3f}")
    assert diff < 0.1  # bf16 attention kernels differ between THD and padded BSHD
