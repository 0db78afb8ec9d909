"""Packed micro-batches for Megatron models, and the packed scoring pass.

A pack (`packing.PackLayout`) is one row `[1, T]` of whole sequences. Two ways to keep them apart:

* local layer spec (CPU, or no Transformer Engine): a block-diagonal causal `attention_mask [1, 1, T, T]`
  (True = masked), which Megatron's DotProductAttention applies through FusedScaleMaskSoftmax. Megatron's GPT
  RoPE uses positions 0..T-1 of the row; inside a block attention only sees relative positions, so each
  sequence scores as if alone (tested against the padded layout to 1e-6 in fp32).
* Transformer Engine: THD with `PackedSeqParams` (`cu_seqlens`), the pack padded to a multiple of TP x 128
  (`packing.thd_pad_multiple`); the padding is a trailing dummy sequence in `cu_seqlens`, as slime does, so no
  `cu_seqlens_*_padded` is needed. RoPE restarts at every `cu_seqlens` boundary there.

`score_packed` is `compute_logprobs` for variable-length sequences: packs planned by
`packing.plan_micro_batches` over the model's DP ranks, results returned per sequence on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlad_megatron import packing
from rlad_megatron.models.builder import Model
from rlad_megatron.models.forward import broadcast_from_last_stage, run_schedule, score_output, unwrap


def uses_te_attention(model: Model) -> bool:
    """True when the layers attend with Transformer Engine (THD packs), False for Megatron's local
    DotProductAttention (mask packs)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    layers = unwrap(model.module).decoder.layers
    if len(layers) == 0:
        raise ValueError("model stage has no transformer layers")
    return not isinstance(layers[0].self_attention.core_attention, DotProductAttention)


@dataclass
class PackedBatch:
    """One packed micro-batch for `run_schedule`: whole sequences back to back in one row of `T` tokens.

    Position t predicts token t+1 of its own sequence where `predict` is True (every position but each sequence's
    last and the padding), so `[1, T]` per-token tensors line up with the model's `[1, T]` outputs.
    """

    tokens: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T] 0..L_i-1 within each sequence
    targets: torch.Tensor  # [1, T] next token within the sequence, 0 where `predict` is False
    predict: torch.Tensor  # [1, T] bool
    layout: packing.PackLayout
    ids: list[int]  # the step's sequence indices this pack holds, in pack order
    attention_mask: torch.Tensor | None = None  # [1, 1, T, T] bool, True = masked (local attention)
    packed_seq_params: object | None = None  # megatron PackedSeqParams (THD, Transformer Engine)

    def per_token(self, rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Prediction-aligned rows of the whole batch (`[N, W, ...]`, e.g. `RolloutBatch.response_mask` /
        `old_logp` `[N, L-1]`; row i holds sequence i's predictions first) -> `[1, T, ...]` for this pack."""
        return packing.pack_predictions(rows[self.ids], self.layout, fill)

    def per_seq(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence values of the whole batch (`[N]`, e.g. advantages) -> `[1, T]`, each repeated over its
        sequence's predictions (0 elsewhere)."""
        return packing.pack_predictions([values[i].expand(n) for i, n in zip(self.ids, self.layout.lengths,
                                                                             strict=True)], self.layout)

    def unpack(self, values: torch.Tensor) -> list[torch.Tensor]:
        """`[1, T, ...]` per-token outputs -> per sequence of the pack `[L_i - 1, ...]` (in `ids` order)."""
        return packing.unpack_predictions(values, self.layout)


def packed_micro_batch(model: Model, seqs: Sequence[torch.Tensor], *, ids: Sequence[int] | None = None,
                       thd: bool | None = None, fp8: bool = False, pad_id: int = 0) -> PackedBatch:
    """`seqs` (1-D token tensors; `ids` = their indices in the step's batch, default 0..n-1) packed in this order,
    with the block-diagonal `attention_mask` (local attention) or `packed_seq_params` (THD: when `thd`, or by
    default when the model attends with Transformer Engine; padded to `packing.thd_pad_multiple(TP, fp8)`)."""
    thd = uses_te_attention(model) if thd is None else thd
    if not thd and model.config.masked_softmax_fusion:
        # the fused causal softmax kernel ignores the attention mask: packs would attend across sequences
        raise ValueError("packed sequences on the local attention path need masked_softmax_fusion=False")
    layout = packing.pack_layout([int(s.numel()) for s in seqs],
                                 packing.thd_pad_multiple(model.tp, fp8) if thd else 1)
    tokens = packing.pack_sequences(seqs, layout, pad_id)
    return PackedBatch(tokens=tokens, position_ids=packing.packed_position_ids(layout),
                       targets=packing.packed_targets(tokens, layout), predict=packing.prediction_mask(layout),
                       layout=layout, ids=list(ids) if ids is not None else list(range(len(seqs))),
                       attention_mask=None if thd else packing.block_causal_mask(layout),
                       packed_seq_params=thd_params(layout) if thd else None)


def packed_micro_batches(model: Model, seqs: Sequence[torch.Tensor], *, max_tokens_per_gpu: int,
                         thd: bool | None = None, fp8: bool = False) -> list[PackedBatch]:
    """This DP rank's packs of `seqs` (1-D token tensors, the same list on every rank) under
    `packing.plan_micro_batches(lengths, model's DP size, max_tokens_per_gpu)`. The count may differ between DP
    ranks: normalise the loss with `packing.loss_scale(len(result), dp, global_denominator)`."""
    lengths = [int(s.numel()) for s in seqs]
    plan = packing.plan_micro_batches(lengths, model.pg.dp.size(), max_tokens_per_gpu)
    return [packed_micro_batch(model, [seqs[i] for i in ids], ids=ids, thd=thd, fp8=fp8)
            for ids in plan[model.pg.dp.rank()]]


def thd_params(layout: packing.PackLayout):
    """Megatron's `PackedSeqParams` for a THD pack (cu_seqlens int32 on the CPU; `run_schedule` moves them)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = packing.thd_cu_seqlens(layout)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def _gather_variable(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate 1-D `x` of length `sizes[rank]` from every rank of `group` (sizes known everywhere)."""
    if group is None or group.size() == 1:
        return x
    width = max(sizes)
    padded = torch.zeros(width, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


@torch.no_grad()
def score_packed(model: Model, seqs: Sequence[torch.Tensor], *, max_tokens_per_gpu: int, temperature: float = 1.0,
                 with_entropy: bool = False, fused: bool = True, thd: bool | None = None,
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-sequence `log p(seq[t+1] | seq[:t+1])` `[L_i - 1]` (and entropy) fp32 on the CPU, on every rank.

    `seqs` (1-D token tensors, replicated on every rank) are planned by `packing.plan_micro_batches` over the
    model's DP ranks with `max_tokens_per_gpu`, run packed through the model's pipeline, scored on the last
    stage (fused from the hidden states by default), broadcast over PP and gathered over DP.
    """
    lengths = [int(s.numel()) for s in seqs]
    dp_rank = model.pg.dp.rank()
    plan = packing.plan_micro_batches(lengths, model.pg.dp.size(), max_tokens_per_gpu)
    micro = packed_micro_batches(model, seqs, max_tokens_per_gpu=max_tokens_per_gpu, thd=thd)
    keys = ("logp", "entropy") if with_entropy else ("logp",)

    def score(mb: PackedBatch, out: torch.Tensor):
        logp, ent = score_output(model, out, mb.targets, fused=fused, temperature=temperature,
                                 with_entropy=with_entropy)
        keep = mb.predict.to(logp.device)
        res = {"logp": logp[keep]}  # the pack's predictions, sequence after sequence
        if with_entropy:
            res["entropy"] = ent[keep]
        return out.new_zeros(()), res

    was_training = model.module.training
    model.module.eval()
    outs = run_schedule(model, model.module, micro, score, forward_only=True, output="hidden" if fused else "logits")
    model.module.train(was_training)
    sizes = [sum(lengths[i] - 1 for ids in rank for i in ids) for rank in plan]
    order = [i for rank in plan for ids in rank for i in ids]  # sequence of every gathered block
    results = []
    for key in keys:
        mine = torch.cat([o[key].float() for o in outs]) if outs else None
        mine = broadcast_from_last_stage(model, mine, (sizes[dp_rank],), torch.float32)
        flat = _gather_variable(mine, sizes, model.pg.dp).cpu()
        per_seq: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        for i, part in zip(order, flat.split([lengths[i] - 1 for i in order]), strict=True):
            per_seq[i] = part
        results.append(per_seq)
    return results[0], (results[1] if with_entropy else None)
