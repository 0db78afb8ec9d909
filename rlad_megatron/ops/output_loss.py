"""Fused output layer + a per-token loss, differentiated in the forward pass: 3 GEMMs, no logits kept, no recompute.

For a loss that is a sum of per-token terms, ``L = sum_t l_t(log p_t, H_t)`` (every policy loss here: GRPO / TRRD /
KDRL ratios, k-estimator KLs, the entropy bonus and the SFT NLL, with aggregation weights that do not depend on the
log-probs), ``dL/dz_{t,v}`` needs only token t's own logits. Each chunk of ``token_chunk`` tokens therefore computes
its rows of this rank's logits once (vocab tile by vocab tile into one ``[c, vocab/tp]`` fp32 buffer):

    z = x_c W^T / T                                    GEMM 1
    M = allreduce_max(max_v z_v)    S = allreduce_sum(sum_v exp(z_v - M))      (per-token scalars cross TP ranks)
    log p(y) = (z_y - M) - log S    H = log S - sum_v p_v (z_v - M)
    g_p, g_H = dL/dlog p(y), dL/dH                     autograd of the caller's ``token_loss`` on ``[n]`` scalars
    dz_v = (g_p (1[v = y] - p_v) - g_H p_v (log p_v + H)) / T
    dx_c = dz W  (all-reduced over TP)                 GEMM 2
    dW  += dz^T x_c                                    GEMM 3

and the backward only scales the stored ``dx``, ``dW`` by the upstream gradient of ``L``. The logits path
(output layer + ``vocab_parallel_logprobs``) needs the same 3 GEMMs but holds ``[tokens, vocab/tp]`` logits and
their gradient; ``output_logprobs`` (differentiable log-probs for any loss) holds neither but recomputes the
logits in its backward (4 GEMMs).

``token_loss(logp [n], entropy [n]) -> (loss, aux)`` is called once per chunk, on leaves that hold every token's
value computed so far (later tokens hold 0): for a per-token loss its gradient at the chunk's tokens is exact. The
last call sees every token; its loss (detached, re-attached to ``hidden`` and ``weight`` by this op) and ``aux``
are returned. A loss that mixes tokens (e.g. GKD's full-distribution terms) must not use this op.

Precision as ``output_logprobs``: softmax math fp32 (fp64 for fp64 inputs), GEMMs in the input dtype on CUDA and
fp32 on the CPU; ``dW`` accumulated over token chunks in fp32 and kept so until the backward casts it (scaled by
the upstream gradient) a vocab tile at a time; ``dx`` all-reduced in fp32 and cast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from rlad_megatron.ops.logprobs import VocabShard, all_reduce
from rlad_megatron.ops.output_logprobs import _dtypes, _owned, _tile_logits, check_output_args

__all__ = ["output_loss"]

CHUNK_ELEMENTS = 16 * 2**20  # token_chunk=None: tokens per chunk x vocab/tp (the size of output_logprobs' tile)

TokenLoss = Callable[[Tensor, Tensor | None], tuple[Tensor, Any]]


def _loss_grads(token_loss: TokenLoss, logp: Tensor, ent: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Any]:
    """(dL/dlogp [n], dL/dH [n] or None, L detached, aux) of ``token_loss`` at the current values."""
    with torch.enable_grad():
        lp = logp.detach().clone().requires_grad_(True)
        h = ent.detach().clone().requires_grad_(True) if ent is not None else None
        loss, aux = token_loss(lp, h)
        if loss.dim() != 0:
            raise ValueError(f"token_loss must return a scalar loss, got shape {tuple(loss.shape)}")
        inputs = [lp] if h is None else [lp, h]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else (None,) * len(inputs)
    g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
    g_h = grads[1] if h is not None and grads[1] is not None else None
    return g_lp.detach(), (g_h.detach() if g_h is not None else None), loss.detach(), aux


class _OutputLoss(torch.autograd.Function):
    """(hidden ``[n, h]``, weight ``[V_local, h]``) -> (loss ``[]``, log p ``[n]``, entropy ``[n]`` or None)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, token_loss: TokenLoss, box: list,
                group: ProcessGroup | None, temperature: float, shard: VocabShard, token_chunk: int,
                vocab_chunk: int, with_entropy: bool):
        n, valid, h_dim = hidden.shape[0], shard.valid, hidden.shape[1]
        gemm, acc = _dtypes(hidden)
        kw = dict(dtype=acc, device=hidden.device)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp = torch.zeros(n, **kw)
        ent = torch.zeros(n, **kw) if with_entropy else None
        dx = torch.zeros(n, h_dim, **kw) if need_x else None
        tiles = [(v0, min(v0 + vocab_chunk, valid)) for v0 in range(0, valid, vocab_chunk)]
        dw = torch.zeros(weight.shape, **kw) if need_w else None  # fp32; padded vocab rows keep a zero gradient
        buf = torch.empty(min(token_chunk, n) * valid, **kw)
        loss, aux = None, None
        for t0 in range(0, n, token_chunk):
            r = slice(t0, min(t0 + token_chunk, n))
            c = r.stop - r.start
            xr = hidden[r].to(gemm)  # [c, h]
            zs = []  # this chunk's logits, one contiguous [c, vb] tile per vocab tile
            for v0, v1 in tiles:
                zs.append(_tile_logits(xr, weight[v0:v1].to(gemm), buf[c * v0:c * v1], temperature))
            m = torch.stack([z.amax(dim=1) for z in zs]).amax(dim=0) if zs else torch.full((c,), float("-inf"), **kw)
            big_m = all_reduce(m, dist.ReduceOp.MAX, group)
            s, q, tz = torch.zeros(c, **kw), torch.zeros(c, **kw), torch.zeros(c, **kw)
            owned = [_owned(targets[r], shard.start + v0, shard.start + v1) for v0, v1 in tiles]
            for z, (own, idx) in zip(zs, owned, strict=True):
                z.sub_(big_m[:, None])  # z - M from here on
                tz = torch.where(own, z.gather(1, idx[:, None]).squeeze(1), tz)
                e = torch.exp(z)
                s += e.sum(dim=1)
                if with_entropy:
                    q += e.mul_(z).sum(dim=1)
                del e
            red = all_reduce(torch.stack([s, tz, q] if with_entropy else [s, tz]), dist.ReduceOp.SUM, group)
            log_s = torch.log(red[0])
            logp[r] = red[1] - log_s
            if with_entropy:
                ent[r] = log_s - red[2] / red[0]
            g_lp, g_h, loss, aux = _loss_grads(token_loss, logp, ent)
            if not (need_x or need_w):
                continue
            g_lp, g_h = g_lp[r].to(acc), (g_h[r].to(acc) if g_h is not None else None)
            live = (g_lp != 0) if g_h is None else (g_lp != 0) | (g_h != 0)
            for (v0, v1), lp, (own, idx) in zip(tiles, zs, owned, strict=True):
                lp.sub_(log_s[:, None])  # log p_v
                p = torch.exp(lp)
                coeff = lp.add_(ent[r, None]).mul_(g_h[:, None]).add_(g_lp[:, None]) if g_h is not None \
                    else g_lp[:, None]
                gz = p.mul_(coeff).neg_()  # [c, vb] = dL/dz_v without the target term
                gz.scatter_add_(1, idx[:, None], torch.where(own, g_lp, 0.0)[:, None])
                gz.masked_fill_(~live[:, None], 0.0)  # no NaN * 0 from tokens the loss ignores
                w = weight[v0:v1].to(gemm)
                gz = gz.to(gemm)
                if gemm == acc:  # fp32 (CPU) / fp64: accumulate in place
                    if need_x:
                        dx[r].addmm_(gz, w)
                    if need_w:
                        dw[v0:v1].addmm_(gz.t(), xr)
                else:  # bf16 GEMMs on CUDA, fp32 accumulators
                    if need_x:
                        dx[r] += gz @ w
                    if need_w:
                        dw[v0:v1] += gz.t() @ xr
        if loss is None:  # no tokens
            _, _, loss, aux = _loss_grads(token_loss, logp, ent)
        del buf
        if need_x:
            if temperature != 1.0:
                dx.div_(temperature)
            dx = all_reduce(dx, dist.ReduceOp.SUM, group).to(hidden.dtype)
        if need_w and temperature != 1.0:
            dw.div_(temperature)
        ctx.save_for_backward(dx, dw)  # dw stays fp32: the backward casts it block by block
        ctx.weight_dtype, ctx.vocab_chunk = weight.dtype, vocab_chunk
        box.append(aux)
        out = (loss.to(acc), logp, ent) if with_entropy else (loss.to(acc), logp)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, g_loss: Tensor, *_):
        dx, dw = ctx.saved_tensors
        grad_w = None
        if dw is not None:  # g * dW in the weight dtype, a block at a time (no second [vocab/tp, h] fp32 tensor)
            grad_w = torch.empty(dw.shape, dtype=ctx.weight_dtype, device=dw.device)
            for v0 in range(0, dw.shape[0], ctx.vocab_chunk):
                grad_w[v0:v0 + ctx.vocab_chunk] = dw[v0:v0 + ctx.vocab_chunk] * g_loss
        return (g_loss * dx if dx is not None else None, grad_w) + (None,) * 9


def output_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss: TokenLoss,
    *,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    with_entropy: bool = False,
    token_chunk: int | None = None,
    vocab_chunk: int = 4096,
) -> tuple[Tensor, Tensor, Tensor | None, Any]:
    """A per-token loss of ``log softmax(hidden @ weight^T / T)[target]`` (and the entropy) with its gradient
    w.r.t. ``hidden`` and ``weight`` computed in the forward pass (module docstring).

    Args:
        hidden: ``[n, h]`` final hidden states, identical on every rank of ``group`` (not sequence-parallel).
        weight: ``[vocab/tp, h]`` this rank's output-layer shard (the embedding shard when tied), same dtype.
        targets: ``[n]`` global token ids in ``[0, vocab_size)``, identical on every rank of ``group``.
        token_loss: ``(logp [n], entropy [n] or None) -> (scalar loss, aux)``; a sum of per-token terms.
        token_chunk, vocab_chunk: working set one fp32 ``[token_chunk, vocab/tp]`` buffer (the chunk's logits,
            turned into log-probs and gradients in place) plus one ``[token_chunk, vocab_chunk]`` exp tile, the
            fp32 ``[vocab/tp, h]`` weight gradient and the ``[n, h]`` hidden gradient. ``token_chunk=None``: as
            many tokens as fit ``CHUNK_ELEMENTS`` logits (64 MiB in fp32; a small vocabulary takes every token
            in one chunk, so the loss is evaluated once).

    Returns:
        ``(loss, logp, entropy, aux)``: ``loss`` a scalar differentiable w.r.t. ``hidden`` (gradient all-reduced
        over ``group``) and ``weight``; ``logp``, ``entropy`` ``[n]`` fp32 without gradient; ``aux`` from the last
        ``token_loss`` call.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [n, h] and targets [n], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if token_chunk is None:
        token_chunk = max(1, CHUNK_ELEMENTS // max(weight.shape[0], 1))
    shard, flat_t = check_output_args(hidden, weight, targets, group=group, temperature=temperature,
                                      vocab_size=vocab_size, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    box: list = []
    out = _OutputLoss.apply(hidden, weight, flat_t, token_loss, box, group, float(temperature), shard,
                            int(token_chunk), int(vocab_chunk), bool(with_entropy))
    loss, logp = out[0], out[1]
    return loss, logp, (out[2] if with_entropy else None), box[0]
