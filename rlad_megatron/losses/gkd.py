"""Full-vocabulary on-policy KD (GKD, Agarwal et al. 2024) between vocab-parallel student and teacher logits.

Both logits are ``[tokens, vocab/tp]`` with the same TP layout over ``group``. With ``s = log softmax(z_S / T)``
and ``t = log softmax(z_T / T)`` over the true vocabulary (padding dropped), per token:

    forward  KL(T || S)  = sum_v p_T (t - s)                      grad_s = p_S - p_T
    reverse  KL(S || T)  = sum_v p_S (s - t)                      grad_s = p_S (s - t - KL)
    jsd(b)               = b KL(T || M) + (1 - b) KL(S || M),     grad_s = (1 - b) p_S (s - m - KL(S || M))
                           M = b p_T + (1 - b) p_S, m = log M     (TRL's ``generalized_jsd_loss`` convention)

where ``grad_s`` is w.r.t. the scaled student logits ``z_S / T`` (then times ``1/T``). Each vocab sum is a local
partial sum plus an all-reduce of per-token scalars; chunks of ``chunk_size`` tokens bound the fp32 working set,
and the backward recomputes per chunk with no communication. The teacher is a constant (no gradient).

Why not ModelOpt's ``LogitsKLLoss`` for the forward KL: it reads Megatron's global TP group, upcasts both whole
``[s, b, vocab/tp]`` shards to fp32 at once (no chunking), keeps padded vocab columns in the softmax, and returns
an un-reduced per-rank partial. ``tests/dist/logprobs_tp_worker.py`` cross-checks our forward KL against it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from rlad_megatron.losses._checks import check_agg, check_mask, check_number
from rlad_megatron.losses.agg import aggregate, masked_mean
from rlad_megatron.ops.logprobs import VocabShard, all_reduce, local_max, shard_chunk, vocab_shard, workspace

__all__ = ["DIVERGENCES", "gkd_loss", "vocab_parallel_divergence"]

DIVERGENCES = ("forward", "reverse", "jsd")


def _log_mix(s: Tensor, t: Tensor, beta: float) -> Tensor:
    """``log(beta p_T + (1 - beta) p_S)`` from log-probs ``s``, ``t``."""
    return torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))


class _VocabParallelDivergence(torch.autograd.Function):
    """Student/teacher ``[tokens, vocab/tp]`` logits -> per-token divergence ``[tokens]``."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, group: ProcessGroup | None, temperature: float,
                shard: VocabShard, chunk_size: int, divergence: str, beta: float) -> Tensor:
        n = student.shape[0]
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        out = torch.empty(n, dtype=dtype, device=student.device)
        lse = torch.empty(2, n, dtype=dtype, device=student.device)  # [student, teacher] log-normalisers
        aux = torch.empty(n, dtype=dtype, device=student.device)  # KL(S||T) or KL(S||M), for the backward
        s_buf, t_buf = workspace(student, shard, chunk_size, 2)
        for c0 in range(0, n, chunk_size):
            rows = slice(c0, min(c0 + chunk_size, n))
            s = shard_chunk(student, rows, shard, temperature, s_buf)  # [c, valid]
            t = shard_chunk(teacher, rows, shard, temperature, t_buf)
            m = all_reduce(torch.stack([local_max(s), local_max(t)]), dist.ReduceOp.MAX, group)  # [2, c]
            s.sub_(m[0, :, None])
            t.sub_(m[1, :, None])
            sums = all_reduce(torch.stack([s.exp().sum(-1), t.exp().sum(-1)]), dist.ReduceOp.SUM, group)
            log_sums = sums.log()
            lse[:, rows] = m + log_sums
            s.sub_(log_sums[0, :, None])  # log p_S
            t.sub_(log_sums[1, :, None])  # log p_T
            if divergence == "forward":
                parts = [(t.exp() * (t - s)).sum(-1)]
            elif divergence == "reverse":
                parts = [(s.exp() * (s - t)).sum(-1)]
            else:
                mix = _log_mix(s, t, beta)
                parts = [(t.exp() * (t - mix)).sum(-1), (s.exp() * (s - mix)).sum(-1)]
            red = all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
            if divergence == "jsd":
                out[rows] = beta * red[0] + (1.0 - beta) * red[1]
                aux[rows] = red[1]
            else:
                out[rows] = red[0]
                aux[rows] = red[0]
        ctx.save_for_backward(student, teacher, lse, aux)
        ctx.cfg = (temperature, shard, chunk_size, divergence, beta)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        student, teacher, lse, aux = ctx.saved_tensors
        temperature, shard, chunk_size, divergence, beta = ctx.cfg
        grad = torch.empty_like(student)
        grad[:, shard.valid:] = 0
        n = student.shape[0]
        s_buf, t_buf = workspace(student, shard, chunk_size, 2)
        for c0 in range(0, n, chunk_size):
            rows = slice(c0, min(c0 + chunk_size, n))
            s = shard_chunk(student, rows, shard, temperature, s_buf).sub_(lse[0, rows, None])  # log p_S
            t = shard_chunk(teacher, rows, shard, temperature, t_buf).sub_(lse[1, rows, None])  # log p_T
            if divergence == "forward":
                gs = s.exp_().sub_(t.exp_())
            elif divergence == "reverse":
                gs = (s - t).sub_(aux[rows, None]).mul_(s.exp())
            else:
                gs = (s - _log_mix(s, t, beta)).sub_(aux[rows, None]).mul_(s.exp()).mul_(1.0 - beta)
            gs.mul_(g[rows, None].to(gs.dtype) / temperature).masked_fill_((g[rows] == 0)[:, None], 0.0)
            grad[rows, : shard.valid] = gs  # rows with zero upstream gradient (masked) stay 0 even for NaN logits
        return grad, None, None, None, None, None, None, None


def vocab_parallel_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward",
    beta: float = 0.5,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-token divergence ``[...]`` (fp32; fp64 for fp64 logits) between ``[..., vocab/tp]`` logits.

    ``divergence``: ``forward`` = KL(T||S), ``reverse`` = KL(S||T), ``jsd`` = generalized JSD with ``beta`` in
    (0, 1). ``group``: TP group of the vocab split (``None`` = TP 1). ``vocab_size``: true vocab size, columns
    beyond it are padding and excluded. Differentiable w.r.t. ``student_logits`` only.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd":
        check_number("beta", beta, 0.0, 1.0, lo_open=True, hi_open=True)
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            raise ValueError(f"{name} must be a floating [..., vocab/tp] tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                         f"{tuple(student_logits.shape)} (same TP layout)")
    check_number("temperature", temperature, 0.0, lo_open=True, hi_open=True)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shard = vocab_shard(student_logits.shape[-1], group, vocab_size)
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    out = _VocabParallelDivergence.apply(student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v),
                                         group, float(temperature), shard, int(chunk_size), divergence, float(beta))
    return out.reshape(lead)


def gkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    divergence: str = "jsd",
    beta: float = 0.5,
    group: ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``agg`` of the per-token divergence over ``mask``; logits ``[batch, resp_len, vocab/tp]``, mask
    ``[batch, resp_len]``. (For Megatron's ``[s, b, vocab/tp]`` layout call ``vocab_parallel_divergence`` and
    transpose its ``[s, b]`` output.) Metrics: ``loss``, ``divergence`` (token mean), ``num_tokens``.
    """
    check_agg(agg)
    mask = check_mask(mask, student_logits.shape[:-1] if isinstance(student_logits, Tensor) else None)
    per_token = vocab_parallel_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta,
                                          group=group, temperature=temperature, vocab_size=vocab_size,
                                          chunk_size=chunk_size)
    bad = ~torch.isfinite(per_token) & mask
    if bool(bad.any()):
        raise ValueError(f"student_logits/teacher_logits: divergence is non-finite at {int(bad.sum())} unmasked "
                         f"token(s) (NaN/inf logits?)")
    loss = aggregate(per_token, mask, agg)
    return loss, {"loss": loss.detach().float(), "divergence": masked_mean(per_token, mask),
                  "num_tokens": mask.sum().float()}
