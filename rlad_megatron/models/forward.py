"""Run a Megatron model over micro-batches with Megatron's own schedules (1F1B when PP > 1).

Each model brings its own process groups, so the teacher (own TP/PP) and the student use the same
code. `compute_logprobs` is the scoring pass: per-token log-probs of the given tokens, computed
vocab-parallel on the last stage and returned in full (`[N, L-1]`) on every rank.

Two ways to score on the last stage: the model's logits `[b, s, vocab/tp]` + `vocab_parallel_logprobs`, or
(`output="hidden"`, `fused=True`) the final hidden states `[s, b, h]` + `ops.output_logprobs`, which never
materialises the logits.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
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
from rlad_megatron.ops.output_logprobs import output_logprobs
from rlad_megatron.ops.output_loss import output_loss

# loss_fn(micro_batch, out) -> (scalar loss, metrics dict); `out` is the logits [b, s, vocab/tp] or, with
# run_schedule(output="hidden"), the final hidden states [s, b, h]
LossFn = Callable[[object, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class TokenBatch:
    """The least a micro-batch is: its token ids `[b, L]` (any object with `.tokens` runs through the schedule)."""

    tokens: torch.Tensor


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def unwrap(module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def output_weight(module) -> torch.Tensor:
    """This stage's output-layer weight `[vocab/tp, h]` as GPTModel._postprocess uses it: the embedding table
    when embeddings are tied (or the last stage's synchronised copy of it under PP), else `output_layer.weight`."""
    gpt = unwrap(module)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def _without_output_layer(gpt) -> Iterator[None]:
    """GPTModel._postprocess returns the decoder output as is when `post_process` is False (what every
    non-last stage does); the decoder's own final layernorm is unaffected."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def hidden_states(module, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  packed_seq_params=None) -> torch.Tensor:
    """The model's forward without the output layer: on the last stage the final hidden states `[s, b, h]`
    (final layernorm applied; `[T, 1, h]` for a pack); elsewhere the stage's output, as `module(...)` returns."""
    gpt = unwrap(module)
    if getattr(gpt, "mtp_process", False):
        raise ValueError("hidden_states: multi-token prediction layers are not supported by the fused output path")
    with _without_output_layer(gpt):
        return module(tokens, position_ids, attention_mask, packed_seq_params=packed_seq_params)


def logprobs_from_hidden(model: Model, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                         with_entropy: bool = False, **chunks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) `[b, s]` fp32 of `targets [b, s]` from the last stage's hidden states
    `[s, b, h]`, vocab-parallel over `model`'s TP group with its output weight (tied or not), padded vocab
    masked. Differentiable w.r.t. the hidden states and the output weight. `chunks`: `token_chunk`,
    `vocab_chunk` of `ops.output_logprobs`."""
    _check_hidden(model, hidden, targets)
    logp, ent = output_logprobs(hidden, output_weight(model.module), targets.t().to(hidden.device),
                                group=model.pg.tp, temperature=temperature, vocab_size=model.spec.vocab_size,
                                with_entropy=with_entropy, **chunks)
    return logp.t(), (ent.t() if ent is not None else None)


def loss_from_hidden(model: Model, hidden: torch.Tensor, targets: torch.Tensor, token_loss, *,
                     temperature: float = 1.0, with_entropy: bool = False, **chunks):
    """A per-token loss of the log-probs (and entropies) `[b, s]` of `targets [b, s]` from the last stage's hidden
    states `[s, b, h]`, differentiated in the forward pass (`ops.output_loss`: the output layer's 3 GEMMs, no
    logits, no recompute). `token_loss(logp [b, s], entropy [b, s] or None) -> (scalar loss, aux)` must be a sum
    of per-token terms. Returns (loss, differentiable w.r.t. the hidden states and the output weight; aux)."""
    s, b = _check_hidden(model, hidden, targets)

    def flat_loss(lp: torch.Tensor, ent: torch.Tensor | None):
        return token_loss(lp.view(s, b).t(), ent.view(s, b).t() if ent is not None else None)

    loss, _, _, aux = output_loss(hidden.reshape(s * b, hidden.shape[-1]), output_weight(model.module),
                                  targets.t().reshape(-1).to(hidden.device), flat_loss, group=model.pg.tp,
                                  temperature=temperature, vocab_size=model.spec.vocab_size, with_entropy=with_entropy,
                                  **chunks)
    return loss, aux


def _check_hidden(model: Model, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    if model.config.sequence_parallel:
        raise ValueError("the fused output layer does not take sequence-parallel hidden states")
    s, b = hidden.shape[:2]
    if targets.shape != (b, s):
        raise ValueError(f"targets must be [b, s] = [{b}, {s}] for hidden states [s, b, h], got "
                         f"{tuple(targets.shape)}")
    return s, b


def model_inputs(mb) -> dict:
    """The GPTModel arguments of a micro-batch on the compute device: `.tokens [b, s]` and, when the micro-batch
    has them (`models.packed.PackedBatch`), `.position_ids`, `.attention_mask` (packs on the local attention
    path) and `.packed_seq_params` (THD)."""
    dev = platform.device()
    tokens = mb.tokens.to(dev)
    pos = getattr(mb, "position_ids", None)
    mask = getattr(mb, "attention_mask", None)
    packed = getattr(mb, "packed_seq_params", None)
    if packed is not None:
        packed = copy.copy(packed)
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            if getattr(packed, name) is not None:
                setattr(packed, name, getattr(packed, name).to(dev))
    return dict(tokens=tokens, position_ids=pos.to(dev) if pos is not None else position_ids(tokens),
                attention_mask=mask.to(dev) if mask is not None else None, packed_seq_params=packed)


def run_schedule(model: Model, module, micro_batches: list, loss_fn: LossFn, *, forward_only: bool,
                 output: str = "logits") -> list[dict]:
    """Forward (and backward unless `forward_only`) over `micro_batches` (each with `.tokens [mbs, L]` and
    optionally `.position_ids`, `.attention_mask`, `.packed_seq_params`; see `model_inputs`). Shapes may differ
    between micro-batches (packs): PP then exchanges tensor shapes before each transfer.
    `output="hidden"` hands `loss_fn` the final hidden states `[s, b, h]` instead of the logits.
    Returns the per-micro-batch metric dicts on the last stage, [] elsewhere."""
    if not micro_batches:
        return []
    if output not in ("logits", "hidden"):
        raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
    shapes = {tuple(mb.tokens.shape) for mb in micro_batches}
    mbs, seq = micro_batches[0].tokens.shape

    def forward_step(data_iterator, mod):
        mb = next(data_iterator)
        inputs = model_inputs(mb)
        if output == "hidden":
            out = hidden_states(mod, inputs["tokens"], inputs["position_ids"], inputs["attention_mask"],
                                inputs["packed_seq_params"])
        else:
            out = mod(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"],
                      packed_seq_params=inputs["packed_seq_params"])
        return out, partial(loss_fn, mb)

    kwargs = dict(pg_collection=model.pg)
    if model.pp > 1:
        schedule = forward_backward_pipelining_without_interleaving
        config = model.config
        if len(shapes) > 1:  # only the p2p layer reads it: a private copy leaves the model's config untouched
            config = copy.copy(config)
            config.variable_seq_lengths = True
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=model.pg.pp, config=config)
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


def score_output(model: Model, out: torch.Tensor, targets: torch.Tensor, *, fused: bool, temperature: float = 1.0,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`[b, s]` log-probs (and entropy) of `targets [b, s]` from the last stage's output: hidden states
    `[s, b, h]` when `fused` (run_schedule(output="hidden")), else logits `[b, s, vocab/tp]`."""
    if fused:
        return logprobs_from_hidden(model, out, targets, temperature=temperature, with_entropy=with_entropy)
    return vocab_parallel_logprobs(out, targets.to(out.device), group=model.pg.tp, temperature=temperature,
                                   vocab_size=model.spec.vocab_size, with_entropy=with_entropy)


@torch.no_grad()
def compute_logprobs(
    model: Model,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    micro_batch_size: int = 1,
    with_entropy: bool = False,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for a replicated `tokens [N, L]`.

    Rows are split over the model's data-parallel replicas, run through the model's own pipeline,
    scored vocab-parallel on the last stage, broadcast over PP and gathered over DP.
    `fused=True` scores from the final hidden states (`logprobs_from_hidden`) without the logits.
    Returns `logp [N, L-1]` (and `entropy [N, L-1]`) in fp32, identical on every rank.
    """
    n, length = tokens.shape
    dp = model.pg.dp.size()
    padded = pad_rows(tokens, dp * micro_batch_size)
    local = padded[split_rows(padded.shape[0], dp, model.pg.dp.rank())]
    micro_batches = [TokenBatch(t) for t in local.split(micro_batch_size)]

    def score(mb: TokenBatch, out: torch.Tensor):
        logp, ent = score_output(model, out, next_tokens(mb.tokens), fused=fused, temperature=temperature,
                                 with_entropy=with_entropy)
        res = {"logp": logp[:, :-1]}
        if with_entropy:
            res["entropy"] = ent[:, :-1]
        return out.new_zeros(()), res

    was_training = model.module.training
    model.module.eval()
    outs = run_schedule(model, model.module, micro_batches, score, forward_only=True,
                        output="hidden" if fused else "logits")
    model.module.train(was_training)
    shape = (local.shape[0], length - 1)
    results = []
    for key in ("logp", "entropy") if with_entropy else ("logp",):
        mine = torch.cat([o[key] for o in outs]) if outs else None
        mine = broadcast_from_last_stage(model, mine, shape, torch.float32)
        results.append(all_gather_rows(mine, model.pg.dp)[:n].cpu())
    return results[0], (results[1] if with_entropy else None)
