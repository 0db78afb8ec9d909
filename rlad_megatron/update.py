"""Policy update: `num_updates_per_rollout` optimizer steps over mini-batches of the rollout batch.

Each mini-batch (global batch) is split over the student's data-parallel ranks, then into
micro-batches run by Megatron's schedule (1F1B when PP > 1). Sequence-mean losses average exactly
(equal rows per micro-batch); `token-mean` is rescaled so the result is the mean over all tokens of
the global batch.
"""

from __future__ import annotations

import math
from argparse import Namespace

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.algos import micro_batch_loss
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.models.builder import Model
from rlad_megatron.models.forward import run_schedule, split_rows


class NonFiniteError(RuntimeError):
    pass


def _mb_dict(batch: RolloutBatch) -> dict:
    """The micro-batch's tensors on the compute device (the batch itself is kept on the CPU)."""
    dev = platform.device()
    return {k: v.to(dev, non_blocking=True) for k, v in vars(batch).items() if v is not None}


def mean_metrics(local: list[dict]) -> dict[str, float]:
    """Average per-micro-batch metrics over every rank that produced some (the last PP stage)."""
    gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    rows = [m for part in gathered for m in part]
    keys = sorted({k for m in rows for k in m})
    return {k: sum(m[k] for m in rows if k in m) / max(1, sum(k in m for m in rows)) for k in keys}


def make_loss_fn(student: Model, args: Namespace, errors: list[str], *, scale: float, teacher_logits_fn=None):
    """The schedule's loss function for one mini-batch. A bad value must not raise on one rank while the
    others wait in a collective: it is recorded in `errors`, the backward runs on a zero loss, and the
    caller raises on every rank after the schedule. `scale` turns a micro-batch token-mean into its share
    of the global token-mean (`n_micro * dp / global_tokens`)."""

    def loss_fn(mb: dict, logits: torch.Tensor):
        try:
            loss, metrics = micro_batch_loss(mb, logits, args=args, tp_group=student.pg.tp,
                                             vocab_size=student.spec.vocab_size, teacher_logits_fn=teacher_logits_fn)
        except ValueError as err:
            errors.append(str(err))
            return logits.sum() * 0.0, {}
        if args.loss_agg == "token-mean":
            loss = loss * (float(mb["response_mask"].sum()) * scale)
        if not torch.isfinite(loss):
            errors.append(f"non-finite loss {float(loss)}")
            return logits.sum() * 0.0, {}
        return loss, metrics

    return loss_fn


def update_policy(student: Model, ddp_module, optimizer, scheduler, batch: RolloutBatch, args: Namespace,
                  *, step: int, teacher_logits_fn=None) -> dict[str, float]:
    n = len(batch)
    n_updates = args.num_updates_per_rollout
    if n % n_updates:
        raise ValueError(f"rollout batch of {n} sequences is not divisible by --num-updates-per-rollout {n_updates}")
    dp, dp_rank = student.pg.dp.size(), student.pg.dp.rank()
    rows = n // n_updates
    if rows % dp:
        raise ValueError(f"global batch of {rows} sequences is not divisible by the data-parallel size {dp}")
    mbs = min(args.micro_batch_size, rows // dp)
    if (rows // dp) % mbs:
        raise ValueError(f"{rows // dp} sequences per data-parallel rank are not divisible by --micro-batch-size {mbs}")
    out: dict[str, float] = {}
    for u in range(n_updates):
        mini = batch.select(slice(u * n // n_updates, (u + 1) * n // n_updates))
        global_tokens = float(mini.response_mask.sum())
        local = mini.select(split_rows(len(mini), dp, dp_rank))
        micro = [_mb_dict(local.select(slice(i, i + mbs))) for i in range(0, len(local), mbs)]
        n_mb = len(micro)

        errors: list[str] = []
        loss_fn = make_loss_fn(student, args, errors, scale=n_mb * dp / max(global_tokens, 1.0),
                               teacher_logits_fn=teacher_logits_fn)
        ddp_module.zero_grad_buffer()
        optimizer.zero_grad()
        metrics = run_schedule(student, ddp_module, micro, loss_fn, forward_only=False)
        all_errors: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(all_errors, errors)
        if any(all_errors):
            first = next(e for e in all_errors if e)[0]
            raise NonFiniteError(f"step {step}, update {u}: {first}")
        ok, grad_norm, _ = optimizer.step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteError(f"step {step}: non-finite gradient norm {grad_norm} in update {u}")
        scheduler.step(1)
        for k, v in mean_metrics(metrics).items():
            out[k] = out.get(k, 0.0) + v / n_updates
        out["grad_norm"] = out.get("grad_norm", 0.0) + (grad_norm or 0.0) / n_updates
        out["update_skipped"] = out.get("update_skipped", 0.0) + (0.0 if ok else 1.0 / n_updates)
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out
