"""Policy update: `num_updates_per_rollout` optimizer steps over mini-batches of the rollout batch.

Each mini-batch (global batch) is split over the student's data-parallel ranks, then into micro-batches run by
Megatron's schedule (1F1B when PP > 1). The loss of the whole mini-batch is exact whatever the split:

    loss_mini = sum_mb (count_mb / count_global) * loss_mb

with `count` = response tokens for `token-mean` and sequences with at least one response token otherwise (each
micro-batch loss is that mean over its own tokens / sequences). Megatron's schedule divides every micro-batch loss
by this rank's number of micro-batches and DDP averages gradients over the DP ranks, so each micro-batch loss is
multiplied by `count_mb / count_global * n_micro * dp` (`loss_scale`).
"""

from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.models.builder import Model
from rlad_megatron.models.forward import next_tokens, run_schedule, split_rows
from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
from rlad_megatron.step.algos import LossConfig, LossContext, PolicyOutput, micro_batch_loss
from rlad_megatron.step.diagnostics import NonFiniteError


@dataclass(frozen=True)
class UpdateConfig:
    num_updates: int = 1  # optimizer steps per rollout batch
    micro_batch_size: int = 1

    @classmethod
    def from_args(cls, args: Namespace) -> UpdateConfig:
        return cls(num_updates=args.num_updates_per_rollout, micro_batch_size=args.micro_batch_size)


@dataclass
class Policy:
    """The trained student: this rank's model stage, its Megatron DDP wrapper, optimizer and LR scheduler."""

    model: Model
    ddp: object
    optimizer: object
    scheduler: object


def loss_count(mb: RolloutBatch, agg: str) -> float:
    """What the micro-batch loss is a mean over: response tokens (`token-mean`) or sequences with any."""
    mask = mb.response_mask > 0
    return float(mask.sum()) if agg == "token-mean" else float(mask.any(dim=-1).sum())


def mean_metrics(local: list[dict]) -> dict[str, float]:
    """Average per-micro-batch metrics over every rank that produced some (the last PP stage)."""
    gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    rows = [m for part in gathered for m in part]
    keys = sorted({k for m in rows for k in m})
    return {k: sum(m[k] for m in rows if k in m) / max(1, sum(k in m for m in rows)) for k in keys}


def make_loss_fn(model: Model, cfg: LossConfig, ctx: LossContext, errors: list[str], *, global_count: float,
                 n_micro: int):
    """The schedule's loss function for one mini-batch. A bad value must not raise on one rank while the others
    wait in a collective: it is recorded in `errors`, the backward runs on a zero loss, and the caller raises on
    every rank after the schedule."""
    dp = model.pg.dp.size()

    def loss_fn(mb: RolloutBatch, logits: torch.Tensor):
        try:
            logp, entropy = vocab_parallel_logprobs(logits, next_tokens(mb.tokens), group=model.pg.tp,
                                                    temperature=cfg.policy_temperature,
                                                    vocab_size=model.spec.vocab_size, with_entropy=True)
            out = PolicyOutput(logp=logp[:, :-1], entropy=entropy[:, :-1], logits=logits)
            loss, metrics = micro_batch_loss(mb, out, cfg, ctx)
        except ValueError as err:
            errors.append(str(err))
            return logits.sum() * 0.0, {}
        loss = loss * (loss_count(mb, cfg.agg) / global_count * n_micro * dp)
        if not torch.isfinite(loss):
            errors.append(f"non-finite loss {float(loss)}")
            return logits.sum() * 0.0, {}
        return loss, metrics

    return loss_fn


def raise_on_any_rank(errors: list[str], where: str) -> None:
    """Collective: every rank raises the first error any rank recorded."""
    everyone: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, errors)
    if any(everyone):
        raise NonFiniteError(f"{where}: {next(e for e in everyone if e)[0]}")


def micro_batches(mini: RolloutBatch, dp: int, dp_rank: int, micro_batch_size: int) -> list[RolloutBatch]:
    """This DP rank's rows of the mini-batch, in micro-batches of `micro_batch_size` rows, on the compute device."""
    if len(mini) % dp:
        raise ValueError(f"global batch of {len(mini)} sequences is not divisible by the data-parallel size {dp}")
    local = mini.select(split_rows(len(mini), dp, dp_rank))
    mbs = min(micro_batch_size, len(local))
    if len(local) % mbs:
        raise ValueError(f"{len(local)} sequences per data-parallel rank are not divisible by --micro-batch-size {mbs}")
    return [local.select(slice(i, i + mbs)).to(platform.device()) for i in range(0, len(local), mbs)]


def accumulate_gradients(policy: Policy, mini: RolloutBatch, cfg: UpdateConfig, loss_cfg: LossConfig,
                         ctx: LossContext, *, where: str) -> list[dict]:
    """Zero the gradients, run the schedule over this DP rank's micro-batches of `mini`: afterwards the DDP grad
    buffers hold the gradient of the loss of the whole mini-batch (finalised over DP/PP/TP by the schedule).
    Returns this rank's per-micro-batch metrics (last PP stage)."""
    model = policy.model
    micro = micro_batches(mini, model.pg.dp.size(), model.pg.dp.rank(), cfg.micro_batch_size)
    errors: list[str] = []
    loss_fn = make_loss_fn(model, loss_cfg, ctx, errors, global_count=max(loss_count(mini, loss_cfg.agg), 1.0),
                           n_micro=len(micro))
    policy.ddp.zero_grad_buffer()
    policy.optimizer.zero_grad()
    metrics = run_schedule(model, policy.ddp, micro, loss_fn, forward_only=False)
    raise_on_any_rank(errors, where)
    return metrics


def update_policy(policy: Policy, batch: RolloutBatch, cfg: UpdateConfig, loss_cfg: LossConfig, ctx: LossContext,
                  *, step: int) -> dict[str, float]:
    """`cfg.num_updates` optimizer steps on consecutive mini-batches of `batch`; returns `actor/*` metrics."""
    n, n_updates = len(batch), cfg.num_updates
    if n % n_updates:
        raise ValueError(f"rollout batch of {n} sequences is not divisible by --num-updates-per-rollout {n_updates}")
    sums: dict[str, float] = {}
    for u in range(n_updates):
        mini = batch.select(slice(u * n // n_updates, (u + 1) * n // n_updates))
        metrics = accumulate_gradients(policy, mini, cfg, loss_cfg, ctx, where=f"step {step}, update {u}")
        ok, grad_norm, _ = policy.optimizer.step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise NonFiniteError(f"step {step}: non-finite gradient norm {grad_norm} in update {u}")
        policy.scheduler.step(1)
        for k, v in {**mean_metrics(metrics), "grad_norm": grad_norm or 0.0,
                     "update_skipped": 0.0 if ok else 1.0}.items():
            sums[k] = sums.get(k, 0.0) + v / n_updates
    out = {f"actor/{k}": v for k, v in sums.items()}
    out["actor/lr"] = policy.optimizer.param_groups[0]["lr"]
    return out
