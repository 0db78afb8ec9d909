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

from rlad_megatron.algos import micro_batch_loss
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.models.builder import Model
from rlad_megatron.models.forward import run_schedule, split_rows


class NonFiniteError(RuntimeError):
    pass


def _mb_dict(batch: RolloutBatch) -> dict:
    return {k: v for k, v in vars(batch).items() if v is not None}


def mean_metrics(local: list[dict]) -> dict[str, float]:
    """Average per-micro-batch metrics over every rank that produced some (the last PP stage)."""
    gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    rows = [m for part in gathered for m in part]
    keys = sorted({k for m in rows for k in m})
    return {k: sum(m[k] for m in rows if k in m) / max(1, sum(k in m for m in rows)) for k in keys}


def update_policy(student: Model, ddp_module, optimizer, scheduler, batch: RolloutBatch, args: Namespace,
                  *, step: int, teacher_logits_fn=None) -> dict[str, float]:
    n = len(batch)
    n_updates = args.num_updates_per_rollout
    if n % n_updates:
        raise ValueError(f"rollout batch of {n} sequences is not divisible by --num-updates-per-rollout {n_updates}")
    dp, dp_rank = student.pg.dp.size(), student.pg.dp.rank()
    mbs = args.micro_batch_size
    out: dict[str, float] = {}
    for u in range(n_updates):
        mini = batch.select(slice(u * n // n_updates, (u + 1) * n // n_updates))
        global_tokens = float(mini.response_mask.sum())
        mini = mini.pad_rows(dp * mbs)
        local = mini.select(split_rows(len(mini), dp, dp_rank))
        micro = [_mb_dict(local.select(slice(i, i + mbs))) for i in range(0, len(local), mbs)]
        n_mb = len(micro)

        def loss_fn(mb: dict, logits: torch.Tensor):
            loss, metrics = micro_batch_loss(mb, logits, args=args, tp_group=student.pg.tp,
                                             vocab_size=student.spec.vocab_size, teacher_logits_fn=teacher_logits_fn)
            if args.loss_agg == "token-mean":
                loss = loss * (float(mb["response_mask"].sum()) * n_mb * dp / max(global_tokens, 1.0))
            if not torch.isfinite(loss):
                raise NonFiniteError(f"step {step}: non-finite loss {float(loss)} in update {u}")
            return loss, metrics

        ddp_module.zero_grad_buffer()
        optimizer.zero_grad()
        metrics = run_schedule(student, ddp_module, micro, loss_fn, forward_only=False)
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
