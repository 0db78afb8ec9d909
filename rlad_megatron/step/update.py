"""Policy update: `num_updates_per_rollout` optimizer steps over mini-batches of the rollout batch.

Each mini-batch (global batch) is split over the student's data-parallel ranks, then into micro-batches run by
Megatron's schedule (1F1B when PP > 1): `--micro-batch-size` padded rows each, or with `--use-dynamic-batch-size`
packs of whole sequences of at most `--max-tokens-per-gpu` tokens, balanced over the DP ranks by token count
(`packing.plan_micro_batches`; the ranks may run different numbers of packs). The loss is computed from the final
hidden states and differentiated in the forward pass (`ops.output_loss`: no `[tokens, vocab/tp]` logits and no
recompute, the losses being sums of per-token terms), except for GKD, whose loss needs the full distributions. A
pack's per-token outputs are laid back out as the padded rows of its sequences, so every loss sees `[b, L-1]` rows
either way. The loss of the whole mini-batch is exact whatever the
split:

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
from rlad_megatron.models.forward import loss_from_hidden, next_tokens, run_schedule, score_output, split_rows
from rlad_megatron.models.packed import PackedBatch, packed_micro_batches
from rlad_megatron.step.algos import ALGOS, LossConfig, LossContext, PolicyOutput, micro_batch_loss
from rlad_megatron.step.diagnostics import NonFiniteError


@dataclass(frozen=True)
class UpdateConfig:
    num_updates: int = 1  # optimizer steps per rollout batch
    micro_batch_size: int = 1  # padded rows per micro-batch (without --use-dynamic-batch-size)
    max_tokens_per_gpu: int | None = None  # --use-dynamic-batch-size: packs of at most this many tokens

    @classmethod
    def from_args(cls, args: Namespace) -> UpdateConfig:
        return cls(num_updates=args.num_updates_per_rollout, micro_batch_size=args.micro_batch_size,
                   max_tokens_per_gpu=args.max_tokens_per_gpu if args.use_dynamic_batch_size else None)


@dataclass
class PackedRows:
    """A pack for the schedule (`.tokens`, `.position_ids`, `.attention_mask`, `.packed_seq_params` of `pack`)
    with the padded rows of its sequences, in pack order, for the loss."""

    pack: PackedBatch
    rows: RolloutBatch

    def __getattr__(self, name: str):
        return getattr(self.pack, name)


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


def fused_output(cfg: LossConfig) -> bool:
    """The schedule hands the loss the final hidden states (fused log-probs) unless the loss needs the logits."""
    return not ALGOS[cfg.algo].teacher_logits


def policy_output(model: Model, mb: RolloutBatch, logits: torch.Tensor, cfg: LossConfig) -> PolicyOutput:
    """The student's `[b, L-1]` log-probs and entropies on the micro-batch's rows from the last stage's logits
    `[b, L, vocab/tp]` (the logits path: GKD's loss needs the full distributions)."""
    logp, ent = score_output(model, logits, next_tokens(mb.tokens), fused=False, temperature=cfg.policy_temperature,
                             with_entropy=True)
    return PolicyOutput(logp=logp[:, :-1], entropy=ent[:, :-1], logits=logits)


def fused_loss(model: Model, mb: RolloutBatch | PackedRows, hidden: torch.Tensor, cfg: LossConfig,
               ctx: LossContext) -> tuple[RolloutBatch, torch.Tensor, dict]:
    """(rows, loss, metrics) of the micro-batch from the last stage's hidden states `[s, b, h]`, the loss
    differentiated in the forward pass (`models.forward.loss_from_hidden`: no logits, no recompute). A pack's
    per-token values go back to its sequences' rows first, so every loss sees `[b, L-1]` rows either way."""
    if isinstance(mb, PackedRows):  # one row of sequences
        rows, targets = mb.rows, mb.pack.targets

        def policy(lp: torch.Tensor, ent: torch.Tensor) -> PolicyOutput:
            return PolicyOutput(logp=rows.prediction_rows(mb.pack.unpack(lp)),
                                entropy=rows.prediction_rows(mb.pack.unpack(ent)))
    else:
        rows, targets = mb, next_tokens(mb.tokens)

        def policy(lp: torch.Tensor, ent: torch.Tensor) -> PolicyOutput:
            return PolicyOutput(logp=lp[:, :-1], entropy=ent[:, :-1])

    loss, metrics = loss_from_hidden(model, hidden, targets, lambda lp, ent: micro_batch_loss(rows, policy(lp, ent),
                                                                                              cfg, ctx),
                                     temperature=cfg.policy_temperature, with_entropy=True)
    return rows, loss, metrics


def make_loss_fn(model: Model, cfg: LossConfig, ctx: LossContext, errors: list[str], *, global_count: float,
                 n_micro: int, fused: bool = False):
    """The schedule's loss function for one mini-batch. A bad value must not raise on one rank while the others
    wait in a collective: it is recorded in `errors`, the backward runs on a zero loss, and the caller raises on
    every rank after the schedule."""
    dp = model.pg.dp.size()

    def loss_fn(mb: RolloutBatch | PackedRows, out: torch.Tensor):
        try:
            if fused:
                rows, loss, metrics = fused_loss(model, mb, out, cfg, ctx)
            else:
                rows = mb
                loss, metrics = micro_batch_loss(mb, policy_output(model, mb, out, cfg), cfg, ctx)
        except ValueError as err:
            errors.append(str(err))
            return out.sum() * 0.0, {}
        loss = loss * (loss_count(rows, cfg.agg) / global_count * n_micro * dp)
        if not torch.isfinite(loss):
            errors.append(f"non-finite loss {float(loss)}")
            return out.sum() * 0.0, {}
        return loss, metrics

    return loss_fn


def raise_on_any_rank(errors: list[str], where: str) -> None:
    """Collective: every rank raises the first error any rank recorded."""
    everyone: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, errors)
    if any(everyone):
        raise NonFiniteError(f"{where}: {next(e for e in everyone if e)[0]}")


def micro_batches(mini: RolloutBatch, model: Model, cfg: UpdateConfig) -> list[RolloutBatch | PackedRows]:
    """This DP rank's share of the mini-batch on the compute device: packs under the token budget, or rows."""
    if cfg.max_tokens_per_gpu:
        packs = packed_micro_batches(model, mini.sequences(), max_tokens_per_gpu=cfg.max_tokens_per_gpu)
        return [PackedRows(p, mini.select(torch.tensor(p.ids)).to(platform.device())) for p in packs]
    return row_micro_batches(mini, model.pg.dp.size(), model.pg.dp.rank(), cfg.micro_batch_size)


def row_micro_batches(mini: RolloutBatch, dp: int, dp_rank: int, micro_batch_size: int) -> list[RolloutBatch]:
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
    micro = micro_batches(mini, model, cfg)
    errors: list[str] = []
    fused = cfg.max_tokens_per_gpu is not None or fused_output(loss_cfg)
    loss_fn = make_loss_fn(model, loss_cfg, ctx, errors, global_count=max(loss_count(mini, loss_cfg.agg), 1.0),
                           n_micro=len(micro), fused=fused)
    policy.ddp.zero_grad_buffer()
    policy.optimizer.zero_grad()
    metrics = run_schedule(model, policy.ddp, micro, loss_fn, forward_only=False,
                           output="hidden" if fused else "logits")
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
