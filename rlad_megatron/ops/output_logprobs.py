"""Fused output layer + per-token log-probabilities: never holds the ``[tokens, vocab/tp]`` logits.

Each rank of the tensor-parallel group ``group`` holds the output-layer rows ``W [vocab/tp, h]`` of the vocab
columns ``[rank * V_local, (rank + 1) * V_local)`` (the embedding table shard when embeddings are tied) and the
full final hidden states ``x [tokens, h]`` (the same on every TP rank, as ColumnParallelLinear's input). With
``z = x W^T / T`` restricted to the true vocabulary (rows ``>= vocab_size`` of the padded table are excluded):

    M      = allreduce_max(max_v z_v)                       log S = log allreduce_sum(sum_v exp(z_v - M))
    log p(y) = (z_y - M) - log S                            H = log S - sum_v p_v (z_v - M)

computed tile by tile (``token_chunk`` tokens x ``vocab_chunk`` vocab rows), the max and sums carried per token
across vocab tiles (online log-sum-exp). Only per-token scalars cross TP ranks (two all-reduces per call). The
backward recomputes each tile's logits (one extra GEMM) and needs no communication except the TP all-reduce of
the hidden-state gradient (what ``copy_to_tensor_model_parallel_region`` does for ColumnParallelLinear):

    dlogp/dz_v = 1[v = y] - p_v          dH/dz_v = -p_v (log p_v + H)          dz/d(xW^T) = 1/T
    dx = sum_v dz_v W_v  (all-reduced over TP)            dW_v = sum_t dz_{t,v} x_t

``M`` and ``log S`` are kept apart (not one ``lse = M + log S``): the backward forms ``log p_v = (z_v - M) - log S``
whose first difference is exact in fp32, so rows with logits near 1e4 keep ~1e-7 relative gradients where a
rounded fp32 ``lse`` would cost ~1e-4.

Precision: softmax math is fp32 (fp64 for fp64 inputs). GEMMs run in the input dtype on CUDA (bf16 tensor cores,
bf16 logits exactly as the model's output layer makes them) and in fp32 on the CPU (no fast bf16 GEMM there; the
bf16 tiles are upcast). The weight gradient of a vocab tile is accumulated over token chunks in fp32 and written
once; the hidden gradient is accumulated in fp32, all-reduced, then cast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from rlad_megatron.ops.logprobs import VocabShard, all_reduce, vocab_shard

__all__ = ["output_logprobs"]


def _dtypes(x: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM dtype, accumulation dtype) for inputs like ``x``."""
    if x.dtype == torch.float64:
        return torch.float64, torch.float64
    return (x.dtype if x.is_cuda else torch.float32), torch.float32


def _tile_logits(h: Tensor, w: Tensor, out: Tensor, temperature: float) -> Tensor:
    """``h [c, h] @ w[vb, h]^T / T`` written into the flat buffer ``out`` (contiguous ``[c, vb]`` view of it, in
    ``out``'s dtype; the caller may modify it in place)."""
    z = out[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if h.dtype == z.dtype:
        torch.matmul(h, w.t(), out=z)
    else:
        z.copy_(h @ w.t())  # bf16 GEMM on CUDA: logits rounded as the model's output layer rounds them
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _owned(targets: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """(mask of rows whose target is a global id in ``[lo, hi)``, its local column index, 0 elsewhere)."""
    idx = targets - lo
    own = (idx >= 0) & (idx < hi - lo)
    return own, torch.where(own, idx, 0)


class _OutputLogProbs(torch.autograd.Function):
    """(hidden ``[n, h]``, weight ``[V_local, h]``) -> (log p(target) ``[n]``, entropy ``[n]`` or None)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, group: ProcessGroup | None, temperature: float,
                shard: VocabShard, token_chunk: int, vocab_chunk: int, with_entropy: bool):
        ctx.set_materialize_grads(False)
        n, valid = hidden.shape[0], shard.valid
        gemm, acc = _dtypes(hidden)
        kw = dict(dtype=acc, device=hidden.device)
        m = torch.full((n,), float("-inf"), **kw)  # running max of z over this rank's vocab
        s = torch.zeros(n, **kw)  # sum exp(z - m)
        q = torch.zeros(n, **kw) if with_entropy else None  # sum exp(z - m) (z - m)
        tz = torch.zeros(n, **kw)  # z_target where this rank owns the target
        x = hidden.to(gemm)
        buf = torch.empty(min(token_chunk, n) * min(vocab_chunk, valid), **kw)
        for v0 in range(0, valid, vocab_chunk):
            v1 = min(v0 + vocab_chunk, valid)
            w = weight[v0:v1].to(gemm)
            for t0 in range(0, n, token_chunk):
                r = slice(t0, min(t0 + token_chunk, n))
                z = _tile_logits(x[r], w, buf, temperature)  # [c, vb]
                own, idx = _owned(targets[r], shard.start + v0, shard.start + v1)
                tz[r] = torch.where(own, z.gather(1, idx[:, None]).squeeze(1), tz[r])
                m_old, s_old = m[r].clone(), s[r].clone()  # copies: m[r], s[r] are views updated below
                m_new = torch.maximum(m_old, z.amax(dim=1))
                alpha = torch.exp(m_old - m_new)  # 0 on the first tile (m_old = -inf)
                e = torch.exp(z.sub_(m_new[:, None]))  # z is now z - m_new
                s[r] = alpha * s_old + e.sum(dim=1)
                if with_entropy:  # re-centre q on the new max: sum e'(z - m_new) = alpha (q + (m_old - m_new) s)
                    shift = torch.where(s_old > 0, (m_old - m_new) * s_old, 0.0)
                    q[r] = alpha * (q[r] + shift) + e.mul_(z).sum(dim=1)
                m[r] = m_new
                del e
        del buf, x
        big_m = all_reduce(m.clone(), dist.ReduceOp.MAX, group)  # [n]
        alpha = torch.where(s > 0, torch.exp(m - big_m), 0.0)  # ranks holding only padding: s = 0, m = -inf
        own, _ = _owned(targets, shard.start, shard.start + valid)
        parts = [s * alpha, torch.where(own, tz, 0.0)]
        if with_entropy:
            parts.append(alpha * (q + torch.where(s > 0, (m - big_m) * s, 0.0)))
        red = all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
        log_s = torch.log(red[0])
        logp = (red[1] - big_m) - log_s
        ent = log_s - red[2] / red[0] if with_entropy else None
        ctx.save_for_backward(hidden, weight, targets, big_m, log_s, ent)
        ctx.cfg = (group, temperature, shard, token_chunk, vocab_chunk)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        none = (None,) * 7
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_x or need_w):
            return (None, None) + none
        hidden, weight, targets, big_m, log_s, ent = ctx.saved_tensors
        group, temperature, shard, token_chunk, vocab_chunk = ctx.cfg
        n, valid = hidden.shape[0], shard.valid
        gemm, acc = _dtypes(hidden)
        kw = dict(dtype=acc, device=hidden.device)
        g_lp = g_logp.to(acc) if g_logp is not None else None
        g_h = g_ent.to(acc) if g_ent is not None else None
        live = torch.zeros(n, dtype=torch.bool, device=hidden.device)  # rows with a non-zero upstream gradient
        for g in (g_lp, g_h):
            if g is not None:
                live |= g != 0
        dx = torch.zeros(n, hidden.shape[1], **kw) if need_x else None
        dw = torch.zeros_like(weight) if need_w else None  # padded vocab rows keep a zero gradient
        x = hidden.to(gemm)
        buf = torch.empty(min(token_chunk, n) * min(vocab_chunk, valid), **kw)
        for v0 in range(0, valid, vocab_chunk):
            v1 = min(v0 + vocab_chunk, valid)
            w = weight[v0:v1].to(gemm)
            dw_acc = None
            if need_w:  # fp32 accumulator of this vocab tile (in place when the weight is fp32 already)
                dw_acc = dw[v0:v1] if dw.dtype == acc else torch.zeros(v1 - v0, hidden.shape[1], **kw)
            for t0 in range(0, n, token_chunk):
                r = slice(t0, min(t0 + token_chunk, n))
                lp = _tile_logits(x[r], w, buf, temperature)
                lp.sub_(big_m[r, None]).sub_(log_s[r, None])  # log p_v = (z_v - M) - log S, both steps exact-ish
                p = torch.exp(lp)
                if g_h is not None:  # coeff_v = g_H (log p_v + H) + g_logp
                    coeff = lp.add_(ent[r, None]).mul_(g_h[r, None])
                    if g_lp is not None:
                        coeff.add_(g_lp[r, None])
                else:
                    coeff = g_lp[r, None]
                gz = p.mul_(coeff).neg_()  # [c, vb] = dL/dz_v without the target term
                if g_lp is not None:
                    own, idx = _owned(targets[r], shard.start + v0, shard.start + v1)
                    gz.scatter_add_(1, idx[:, None], torch.where(own, g_lp[r], 0.0)[:, None])
                gz.masked_fill_(~live[r, None], 0.0)  # no NaN * 0 from rows nobody differentiates
                gz = gz.to(gemm)
                if need_x:
                    if gemm == acc:
                        dx[r].addmm_(gz, w)
                    else:
                        dx[r] += gz @ w
                if need_w:
                    if gemm == acc:
                        dw_acc.addmm_(gz.t(), x[r])
                    else:
                        dw_acc += gz.t() @ x[r]
            if need_w:
                if temperature != 1.0:
                    dw_acc.div_(temperature)
                if dw_acc.data_ptr() != dw[v0:v1].data_ptr():
                    dw[v0:v1] = dw_acc
        if need_x:
            if temperature != 1.0:
                dx.div_(temperature)
            dx = all_reduce(dx, dist.ReduceOp.SUM, group).to(hidden.dtype)
        return (dx, dw) + none


def check_output_args(hidden: Tensor, weight: Tensor, targets: Tensor, *, group: ProcessGroup | None,
                      temperature: float, vocab_size: int | None, token_chunk: int,
                      vocab_chunk: int) -> tuple[VocabShard, Tensor]:
    """The checks shared by the fused output-layer ops (weight shard, targets, temperature, tiles); returns this
    rank's vocab shard and the targets flattened to int64 ``[n]``."""
    if not hidden.is_floating_point() or weight.dim() != 2 or weight.dtype != hidden.dtype \
            or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab/tp, h={hidden.shape[-1]}] in the hidden dtype {hidden.dtype}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk}, {vocab_chunk}")
    shard = vocab_shard(weight.shape[0], group, vocab_size)
    flat_t = targets.reshape(-1).long()
    if flat_t.numel() and (int(flat_t.min()) < 0 or int(flat_t.max()) >= shard.vocab_size):
        raise ValueError(f"targets must be token ids in [0, vocab_size={shard.vocab_size}), got range "
                         f"[{int(flat_t.min())}, {int(flat_t.max())}]")
    return shard, flat_t


def output_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    token_chunk: int = 4096,
    vocab_chunk: int = 4096,
) -> tuple[Tensor, Tensor | None]:
    """Per-token ``log softmax(hidden @ weight^T / T)[target]`` (and entropy) without materialising the logits.

    Args:
        hidden: ``[..., h]`` final hidden states (after the final norm), identical on every rank of ``group``
            (not sequence-parallel). Leading dims are flattened with ``reshape``.
        weight: ``[vocab/tp, h]`` this rank's output-layer shard (the embedding shard when tied), same dtype.
        targets: ``[...]`` global token ids in ``[0, vocab_size)``, identical on every rank of ``group``.
        group: the tensor-parallel group the vocab is split over; ``None`` = TP 1.
        temperature: logits are divided by it before the softmax.
        vocab_size: the true vocab size; rows ``>= vocab_size`` of the padded table are excluded. ``None`` = none.
        with_entropy: also return the entropy of ``softmax(logits / T)``.
        token_chunk, vocab_chunk: tile shape. Working set: one fp32 ``[token_chunk, vocab_chunk]`` tile plus its
            exp (2 x 64 MiB at the defaults), per-token fp32 scalars; the backward adds the fp32 ``[tokens, h]``
            hidden gradient, an fp32 ``[vocab_chunk, h]`` weight-gradient tile and the ``[vocab/tp, h]`` gradient.

    Returns:
        ``(logp, entropy)``: ``[...]`` fp32 (fp64 for fp64 inputs); entropy ``None`` unless requested. Both are
        differentiable w.r.t. ``hidden`` (gradient all-reduced over ``group``) and ``weight``.
    """
    if hidden.dim() < 1 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    shard, flat_t = check_output_args(hidden, weight, targets, group=group, temperature=temperature,
                                      vocab_size=vocab_size, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    lead = targets.shape
    logp, ent = _OutputLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_t, group, float(temperature),
                                      shard, int(token_chunk), int(vocab_chunk), bool(with_entropy))
    return logp.reshape(lead), (ent.reshape(lead) if ent is not None else None)
