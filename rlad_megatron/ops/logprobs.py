"""Vocab-parallel per-token log-probabilities and entropy.

Each rank of the tensor-parallel group ``group`` holds the logit columns
``[rank * V_local, (rank + 1) * V_local)`` of a ``[tokens, vocab/tp]`` tensor. With ``z = logits / T``
restricted to the true vocabulary (columns ``>= vocab_size`` are padding and excluded from the softmax):

    m      = allreduce_max(max_v z_v)
    S      = allreduce_sum(sum_v exp(z_v - m))
    lse    = m + log S
    log p(y) = allreduce_sum(z_y on the owning rank) - lse
    H      = lse - allreduce_sum(sum_v p_v z_v)            (computed as log S - sum_v p_v (z_v - m))

Only per-token scalars are all-reduced; no rank ever holds more than ``chunk_size x V_local`` values of the
upcast logits. The backward pass needs no communication (``m``, ``log S`` and ``H`` are global):

    d log p(y) / dz_v = 1[v = y] - p_v
    d H / dz_v        = -p_v (log p_v + H)

and ``dz/dlogits = 1/T``. Backward recomputes ``log p_v = (z_v - m) - log S`` from ``m`` and ``log S`` kept
separately: one fp32 ``lse = m + log S`` would round ``log p_v`` to the ulp of ``m`` (1e-3 at logits ~1e4, i.e.
1e-4 relative gradient error), while ``z_v - m`` is exact for the large entries (Sterbenz) and the gradient keeps
~1e-6 relative accuracy, as fp32 ``log_softmax`` does. The input logits are never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = ["VocabShard", "all_reduce", "shard_chunk", "vocab_parallel_logprobs", "vocab_shard", "workspace"]


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the (padded) vocabulary: global columns ``[start, start + local)``.

    Only the first ``valid`` local columns are real tokens; the rest is padding.
    """

    rank: int
    world: int
    start: int
    local: int
    valid: int
    vocab_size: int


def vocab_shard(local_vocab: int, group: ProcessGroup | None, vocab_size: int | None) -> VocabShard:
    """Locate this rank's vocab slice inside ``group`` (``None`` = TP 1); validates ``vocab_size``."""
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    if rank < 0:
        raise ValueError("group: this rank is not a member of the given process group")
    padded = local_vocab * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size must be in (0, {padded}] (= vocab/tp * tp), got {vocab_size}")
    start = rank * local_vocab
    valid = min(max(vocab_size - start, 0), local_vocab)
    return VocabShard(rank=rank, world=world, start=start, local=local_vocab, valid=valid, vocab_size=vocab_size)


def all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup | None) -> Tensor:
    """In-place all-reduce over ``group``; a no-op for ``group=None`` or a group of one rank."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); every other float dtype is upcast to fp32 per chunk."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def workspace(logits: Tensor, shard: VocabShard, chunk_size: int, count: int) -> list[Tensor]:
    """``count`` reusable upcast buffers ``[min(chunk_size, tokens), valid]`` (no per-chunk allocations)."""
    shape = (min(chunk_size, logits.shape[0]), shard.valid)
    return [torch.empty(shape, dtype=compute_dtype(logits.dtype), device=logits.device) for _ in range(count)]


def shard_chunk(logits: Tensor, rows: slice, shard: VocabShard, temperature: float, out: Tensor) -> Tensor:
    """``logits[rows, :valid] / T`` upcast into ``out[:chunk]``: ``[chunk, valid]``, padded columns dropped.

    Never a view of ``logits``, so callers may modify the result in place.
    """
    z = out[: rows.stop - rows.start]
    z.copy_(logits[rows, : shard.valid])
    if temperature != 1.0:
        z.div_(temperature)
    return z


def local_max(z: Tensor) -> Tensor:
    """Row max of ``[chunk, valid]``; ``-inf`` when this rank holds only padding (``valid == 0``)."""
    if z.shape[-1] == 0:
        return torch.full(z.shape[:-1], float("-inf"), dtype=z.dtype, device=z.device)
    return z.amax(dim=-1)


def _check_args(logits: Tensor, targets: Tensor, temperature: float, chunk_size: int, shard: VocabShard) -> None:
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a floating [tokens, vocab/tp] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if targets.dtype not in (torch.int32, torch.int64) or targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be integer [tokens]={tuple(logits.shape[:1])}, got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= shard.vocab_size):
        raise ValueError(f"targets must be token ids in [0, vocab_size={shard.vocab_size}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """``[tokens, vocab/tp]`` logits -> (log p(target) ``[tokens]``, entropy ``[tokens]`` or None)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group: ProcessGroup | None, temperature: float,
                shard: VocabShard, chunk_size: int, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        n = logits.shape[0]
        dtype = compute_dtype(logits.dtype)
        logp = torch.empty(n, dtype=dtype, device=logits.device)
        shift = torch.empty(n, dtype=dtype, device=logits.device)  # m
        log_sum = torch.empty(n, dtype=dtype, device=logits.device)  # log S
        ent = torch.empty(n, dtype=dtype, device=logits.device) if with_entropy else None
        z_buf, e_buf = workspace(logits, shard, chunk_size, 2)
        for s in range(0, n, chunk_size):
            rows = slice(s, min(s + chunk_size, n))
            z = shard_chunk(logits, rows, shard, temperature, z_buf)  # [c, valid]
            m = all_reduce(local_max(z), dist.ReduceOp.MAX, group)  # [c]
            z.sub_(m[:, None])  # z - m, global shift
            e = torch.exp(z, out=e_buf[: z.shape[0]])
            idx = targets[rows] - shard.start
            own = (idx >= 0) & (idx < shard.valid)
            tgt = z.gather(1, torch.where(own, idx, 0)[:, None]).squeeze(1) if shard.valid else z.new_zeros(idx.shape)
            parts = [e.sum(dim=-1), torch.where(own, tgt, 0.0)]
            if with_entropy:
                parts.append(e.mul_(z).sum(dim=-1))  # sum_v exp(z_v - m) (z_v - m), reuses e
            red = all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)  # [2 or 3, c]
            log_s = torch.log(red[0])
            logp[rows] = red[1] - log_s
            shift[rows], log_sum[rows] = m, log_s
            if with_entropy:
                ent[rows] = log_s - red[2] / red[0]
        ctx.save_for_backward(logits, targets, shift, log_sum, ent)
        ctx.cfg = (temperature, shard, chunk_size)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        if g_logp is None and g_ent is None:
            return (None,) * 7
        logits, targets, shift, log_sum, ent = ctx.saved_tensors
        temperature, shard, chunk_size = ctx.cfg
        grad = torch.empty_like(logits)
        grad[:, shard.valid:] = 0
        n = logits.shape[0]
        lp_buf, p_buf = workspace(logits, shard, chunk_size, 2)
        for s in range(0, n, chunk_size):
            rows = slice(s, min(s + chunk_size, n))
            z = shard_chunk(logits, rows, shard, temperature, lp_buf)
            lp = z.sub_(shift[rows, None]).sub_(log_sum[rows, None])  # log p_v = (z_v - m) - log S  [c, valid]
            p = torch.exp(lp, out=p_buf[: lp.shape[0]])
            if g_ent is not None:  # coeff_v = g_H (log p_v + H) + g_logp
                coeff = lp.add_(ent[rows, None]).mul_(g_ent[rows, None].to(lp.dtype))
                if g_logp is not None:
                    coeff.add_(g_logp[rows, None].to(lp.dtype))
            else:
                coeff = g_logp[rows, None].to(lp.dtype)
            gz = p.mul_(coeff).neg_()  # -p_v coeff_v
            if g_logp is not None and shard.valid:
                idx = targets[rows] - shard.start
                own = (idx >= 0) & (idx < shard.valid)
                add = torch.where(own, g_logp[rows].to(gz.dtype), 0.0)
                gz.scatter_add_(1, torch.where(own, idx, 0)[:, None], add[:, None])
            if temperature != 1.0:
                gz.div_(temperature)
            dead = (g_logp[rows] == 0) if g_logp is not None else torch.ones_like(shift[rows], dtype=torch.bool)
            if g_ent is not None:
                dead &= g_ent[rows] == 0
            grad[rows, : shard.valid] = gz.masked_fill_(dead[:, None], 0.0)  # masked rows: no NaN * 0 leaks
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token ``log softmax(logits / T)[target]`` and (optionally) entropy from vocab-parallel logits.

    Args:
        logits: ``[..., vocab/tp]`` this rank's vocab shard (any float dtype; bf16 stays bf16, chunks are upcast).
            Leading dims are flattened with ``reshape`` (a copy if non-contiguous).
        targets: ``[...]`` global token ids in ``[0, vocab_size)``, identical on every rank of ``group``.
        group: the tensor-parallel group the vocab is split over; ``None`` = TP 1 (no collectives).
        temperature: logits are divided by it before the softmax (match the rollout sampler).
        vocab_size: the true vocab size; columns ``>= vocab_size`` (padding) are excluded. ``None`` = no padding.
        chunk_size: tokens per chunk. Working set: two fp32 ``[chunk_size, vocab/tp]`` buffers, plus the
            ``[tokens, vocab/tp]`` gradient (logits dtype) in backward. 1024 x 75,968 (Qwen, TP 2) = 2 x 297 MiB.
        with_entropy: also return the entropy of ``softmax(logits / T)``.

    Returns:
        ``(logp, entropy)``: ``[...]`` fp32 (fp64 for fp64 logits); ``entropy`` is ``None`` unless requested.
        Both are differentiable w.r.t. ``logits``.
    """
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    shard = vocab_shard(logits.shape[-1], group, vocab_size)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    flat_t = targets.reshape(-1)
    _check_args(flat, flat_t, temperature, chunk_size, shard)
    logp, ent = _VocabParallelLogProbEntropy.apply(flat, flat_t, group, float(temperature), shard, int(chunk_size),
                                                   bool(with_entropy))
    return logp.reshape(lead), (ent.reshape(lead) if ent is not None else None)
