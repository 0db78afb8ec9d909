"""Run a Megatron model over micro-batches with Megatron's own schedules (1F1B when PP > 1).

Each model brings its own process groups, so the teacher (own TP/PP) and the student use the same
code. `compute_logprobs` is the scoring pass: per-token log-probs of the given tokens, computed
vocab-parallel on the last stage and returned in full (`[N, L-1]`) on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)

from rlad_megatron import platform
from rlad_megatron.models.builder import Model
from rlad_megatron.ops.logprobs import vocab_parallel_logprobs

# loss_fn(micro_batch, logits [b, s, vocab/tp]) -> (scalar loss, metrics dict)
LossFn = Callable[[object, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class TokenBatch:
    """The least a micro-batch is: its token ids `[b, L]` (any object with `.tokens` runs through the schedule)."""

    tokens: torch.Tensor


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def run_schedule(model: Model, module, micro_batches: list, loss_fn: LossFn, *, forward_only: bool) -> list[dict]:
    """Forward (and backward unless `forward_only`) over `micro_batches` (each with `.tokens [mbs, L]`, all the
    same shape). Returns the per-micro-batch metric dicts on the last stage, [] elsewhere."""
    if not micro_batches:
        return []
    mbs, seq = micro_batches[0].tokens.shape

    def forward_step(data_iterator, mod):
        mb = next(data_iterator)
        tokens = mb.tokens.to(platform.device())
        out = mod(tokens, position_ids(tokens), None)
        return out, partial(loss_fn, mb)

    kwargs = dict(pg_collection=model.pg)
    if model.pp > 1:
        schedule = forward_backward_pipelining_without_interleaving
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=model.pg.pp, config=model.config)
    else:
        schedule = forward_backward_no_pipelining
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[module],
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
        **kwargs,
    )


def next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """`[b, L]` targets aligned with every logit position (the last one gets a dummy 0): scoring the full
    `[b, L, vocab/tp]` logits avoids copying a non-contiguous `[:, :-1]` slice of them."""
    return torch.cat([tokens[:, 1:], tokens.new_zeros(tokens.shape[0], 1)], dim=1)


def split_rows(n: int, world: int, rank: int) -> slice:
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.shape[0]) % multiple
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))]) if extra else x


def broadcast_from_last_stage(model: Model, x: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if model.pp == 1:
        return x
    if x is None:
        x = torch.empty(shape, dtype=dtype, device=platform.device())
    src = dist.get_global_rank(model.pg.pp, model.pp - 1)
    dist.broadcast(x, src=src, group=model.pg.pp)
    return x


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or group.size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def compute_logprobs(
    model: Model,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    micro_batch_size: int = 1,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for a replicated `tokens [N, L]`.

    Rows are split over the model's data-parallel replicas, run through the model's own pipeline,
    scored vocab-parallel on the last stage, broadcast over PP and gathered over DP.
    Returns `logp [N, L-1]` (and `entropy [N, L-1]`) in fp32, identical on every rank.
    """
    n, length = tokens.shape
    dp = model.pg.dp.size()
    padded = pad_rows(tokens, dp * micro_batch_size)
    local = padded[split_rows(padded.shape[0], dp, model.pg.dp.rank())]
    micro_batches = [TokenBatch(t) for t in local.split(micro_batch_size)]

    def score(mb: TokenBatch, logits: torch.Tensor):
        logp, ent = vocab_parallel_logprobs(logits, next_tokens(mb.tokens).to(logits.device), group=model.pg.tp,
                                            temperature=temperature, vocab_size=model.spec.vocab_size,
                                            with_entropy=with_entropy)
        out = {"logp": logp[:, :-1]}
        if with_entropy:
            out["entropy"] = ent[:, :-1]
        return logits.new_zeros(()), out

    was_training = model.module.training
    model.module.eval()
    outs = run_schedule(model, model.module, micro_batches, score, forward_only=True)
    model.module.train(was_training)
    shape = (local.shape[0], length - 1)
    results = []
    for key in ("logp", "entropy") if with_entropy else ("logp",):
        mine = torch.cat([o[key] for o in outs]) if outs else None
        mine = broadcast_from_last_stage(model, mine, shape, torch.float32)
        results.append(all_gather_rows(mine, model.pg.dp)[:n].cpu())
    return results[0], (results[1] if with_entropy else None)
