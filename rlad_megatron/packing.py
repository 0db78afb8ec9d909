"""Token-budget packing of variable-length sequences (slime's `--use-dynamic-batch-size --max-tokens-per-gpu`).

Pure functions, torch only. Three steps:

1. `plan_micro_batches(lengths, dp, max_tokens_per_gpu)`: sequences -> data-parallel ranks balanced by token
   count (Karmarkar-Karp largest differencing) -> per rank, micro-batches of at most `max_tokens_per_gpu`
   tokens (first-fit decreasing). Deterministic: every rank computes the same plan from the same lengths, and
   the stages of one pipeline (same DP rank) share its packs. The micro-batch COUNT may differ between DP
   ranks; `loss_scale` keeps the loss exact anyway (see there).
2. `pack_layout` + `pack_sequences`: one micro-batch = one row `[1, T]` of concatenated sequences, optionally
   padded at the end to a multiple (`thd_pad_multiple`: TP x 128 for Transformer Engine's THD format; the
   padding is a dummy trailing segment, as slime does).
3. Per-token views of a pack: per-sequence `position_ids`, the block-diagonal causal `block_causal_mask` (the
   local attention path), `thd_cu_seqlens` (the TE path), next-token `packed_targets`, and
   `unpack_predictions` / `pack_predictions` between a pack and per-sequence `[L_i - 1]` prediction tensors
   (position t of sequence i predicts its token t+1, as in `batch.RolloutBatch`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PackLayout", "balanced_partition", "block_causal_mask", "loss_scale", "pack_layout", "pack_predictions",
    "pack_sequences", "packed_position_ids", "packed_targets", "plan_micro_batches", "prediction_mask",
    "segment_ids", "split_by_budget", "thd_cu_seqlens", "thd_pad_multiple", "unpack_predictions",
]


# ------------------------------------------------------------------ partition


def balanced_partition(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of `lengths` split into `parts` groups of near-equal token sums (Karmarkar-Karp k-way largest
    differencing: repeatedly merge the two partial partitions with the largest spread, pairing the heaviest
    group of one with the lightest of the other). Every group is non-empty; indices ascend within a group."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if len(lengths) < parts:
        raise ValueError(f"{len(lengths)} sequences cannot fill {parts} data-parallel ranks (need one per rank)")
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for tie, i in enumerate(order):  # `tie` makes heap order (and so the result) deterministic
        state = [(int(lengths[i]), [i])] + [(0, []) for _ in range(parts - 1)]
        heap.append((-int(lengths[i]), tie, state))
    heapq.heapify(heap)
    tie = len(order)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b), strict=True)]
        merged.sort(key=lambda g: -g[0])  # stable: deterministic
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    groups = [sorted(ids) for _, ids in heap[0][2]]
    while any(not g for g in groups):  # defensive: never leave a rank without work (it would skip collectives)
        donor = max(groups, key=len)
        groups[groups.index(min(groups, key=len))].append(donor.pop(donor.index(min(donor, key=lambda i: lengths[i]))))
    return [sorted(g) for g in groups]


def _check_budget(lengths: Sequence[int], max_tokens: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"--max-tokens-per-gpu must be >= 1, got {max_tokens}")
    longest = max(lengths, default=0)
    if longest > max_tokens:
        raise ValueError(f"a sequence of {longest} tokens (prompt + response) exceeds --max-tokens-per-gpu "
                         f"{max_tokens}; raise --max-tokens-per-gpu to at least {longest}")
    if min(lengths, default=1) < 1:
        raise ValueError("every sequence must have at least one token")


def split_by_budget(lengths: Sequence[int], indices: Sequence[int], max_tokens: int) -> list[list[int]]:
    """`indices` into micro-batches of at most `max_tokens` tokens each (first-fit decreasing: few, full packs).
    Indices ascend within a micro-batch."""
    _check_budget([lengths[i] for i in indices], max_tokens)
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(indices, key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def plan_micro_batches(lengths: Sequence[int], dp: int, max_tokens_per_gpu: int) -> list[list[list[int]]]:
    """`plan[r][k]`: the sequence indices of micro-batch k on data-parallel rank r.

    Ranks get near-equal token totals; each micro-batch holds at most `max_tokens_per_gpu` sequence tokens
    (any THD padding of the pack, < TP x 128 tokens, comes on top)."""
    _check_budget(lengths, max_tokens_per_gpu)
    return [split_by_budget(lengths, part, max_tokens_per_gpu) for part in balanced_partition(lengths, dp)]


def loss_scale(num_micro_batches: int, dp: int, denominator: float) -> float:
    """Factor for a micro-batch loss SUM so that the update is exact for any packing, micro-batch count and DP
    split: return `sum_t w_t l_t * loss_scale(n_micro_local, dp, D)` from the loss function.

    Megatron's schedule divides each returned loss by this rank's micro-batch count and DDP averages the
    gradients over the `dp` ranks, so the gradient is `sum over all tokens of w_t grad l_t / D`: token-mean uses
    `w_t = 1` and `D` = response tokens of the global batch; seq-mean-token-mean uses `w_t = 1 / (response
    tokens of t's sequence)` and `D` = sequences of the global batch. `n_micro_local` is this DP rank's count
    (the same on every stage of its pipeline); ranks with different counts stay exact."""
    if num_micro_batches < 1 or dp < 1 or not denominator > 0:
        raise ValueError(f"need num_micro_batches >= 1, dp >= 1, denominator > 0; got {num_micro_batches}, {dp}, "
                         f"{denominator}")
    return num_micro_batches * dp / denominator


# ------------------------------------------------------------------ pack layout


@dataclass(frozen=True)
class PackLayout:
    """One packed row: sequences of `lengths` tokens back to back from offset 0, then padding up to `total`."""

    lengths: tuple[int, ...]
    total: int

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each sequence; `offsets[i + 1] - offsets[i] = lengths[i]` (one extra entry: the end)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_predictions(self) -> int:
        return sum(n - 1 for n in self.lengths)


def thd_pad_multiple(tp: int, fp8: bool = False) -> int:
    """What a THD pack is padded to: TP x 128 (slime; divisible by TP for sequence parallelism), and by 16 for
    FP8 GEMMs (already true of TP x 128; kept explicit)."""
    base = tp * 128
    return math.lcm(base, 16) if fp8 else base


def pack_layout(lengths: Sequence[int], multiple: int = 1) -> PackLayout:
    """The layout of sequences of `lengths` packed in this order, padded to a multiple of `multiple`."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"a pack needs at least one sequence and every sequence >= 1 token, got {list(lengths)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    tokens = sum(lengths)
    return PackLayout(lengths=tuple(int(n) for n in lengths), total=-(-tokens // multiple) * multiple)


def pack_sequences(seqs: Sequence[Tensor], layout: PackLayout, pad_id: int = 0) -> Tensor:
    """1-D token tensors -> `[1, total]` (padding = `pad_id`)."""
    if tuple(int(s.numel()) for s in seqs) != layout.lengths:
        raise ValueError(f"sequence lengths {[int(s.numel()) for s in seqs]} do not match the layout "
                         f"{list(layout.lengths)}")
    row = torch.cat([s.reshape(-1) for s in seqs])
    pad = layout.total - row.numel()
    if pad:
        row = torch.cat([row, row.new_full((pad,), pad_id)])
    return row.unsqueeze(0)


def segment_ids(layout: PackLayout) -> Tensor:
    """`[total]` int64: the sequence (position in the pack) of every token; the padding is segment `len(lengths)`."""
    counts = torch.tensor(list(layout.lengths) + [layout.total - layout.tokens])
    return torch.repeat_interleave(torch.arange(len(layout.lengths) + 1), counts)


def packed_position_ids(layout: PackLayout) -> Tensor:
    """`[1, total]` int64: 0..L_i-1 within each sequence (and within the padding)."""
    seg = segment_ids(layout)
    starts = torch.tensor(layout.offsets)[seg]
    return (torch.arange(layout.total) - starts).unsqueeze(0)


def block_causal_mask(layout: PackLayout) -> Tensor:
    """`[1, 1, total, total]` bool, True = masked (Megatron's local attention convention): token i attends to
    token j iff both are in the same sequence (or both padding) and j <= i."""
    seg = segment_ids(layout)
    idx = torch.arange(layout.total)
    masked = (seg[:, None] != seg[None, :]) | (idx[None, :] > idx[:, None])
    return masked[None, None]


def thd_cu_seqlens(layout: PackLayout) -> Tensor:
    """int32 cumulative sequence lengths for THD attention: `[0, L_1, L_1 + L_2, ..., tokens]`, plus `total`
    when the pack is padded (the padding attends as one more, dummy, sequence)."""
    cu = list(layout.offsets)
    if layout.total > layout.tokens:
        cu.append(layout.total)
    return torch.tensor(cu, dtype=torch.int32)


# ------------------------------------------------------------------ per-token views


def prediction_mask(layout: PackLayout) -> Tensor:
    """`[1, total]` bool: True where position t predicts a token of its own sequence (all but each sequence's
    last token and the padding)."""
    seg = segment_ids(layout)
    last = torch.tensor(layout.offsets[1:]) - 1
    mask = seg < len(layout.lengths)
    mask[last] = False
    return mask.unsqueeze(0)


def packed_targets(tokens: Tensor, layout: PackLayout) -> Tensor:
    """`[1, total]` next token of the same sequence at every predicting position, 0 elsewhere."""
    nxt = torch.cat([tokens[:, 1:], tokens.new_zeros(tokens.shape[0], 1)], dim=1)
    return torch.where(prediction_mask(layout).to(tokens.device), nxt, 0)


def unpack_predictions(values: Tensor, layout: PackLayout) -> list[Tensor]:
    """Per-token values of a pack (`[total, ...]` or `[1, total, ...]`) -> per sequence `[L_i - 1, ...]` (the
    predictions of its tokens 1..L_i-1; views)."""
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == layout.total:
        values = values[0]
    if values.shape[0] != layout.total:
        raise ValueError(f"values have {values.shape[0]} positions, the pack has {layout.total}")
    return [values[o:o + n - 1] for o, n in zip(layout.offsets, layout.lengths, strict=False)]


def pack_predictions(rows: Tensor | Sequence[Tensor], layout: PackLayout, fill: float = 0.0) -> Tensor:
    """Per-sequence prediction-aligned values -> `[1, total, ...]` (`fill` at the non-predicting positions).

    `rows` is a list of `[>= L_i - 1, ...]` tensors or a `[n, W, ...]` tensor (e.g. `response_mask[ids]` of the
    padded batch layout, `W = L_max - 1`); only the first `L_i - 1` entries of row i are used."""
    if len(rows) != len(layout.lengths):
        raise ValueError(f"{len(rows)} rows for a pack of {len(layout.lengths)} sequences")
    first = rows[0]
    out = torch.full((layout.total, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
    for row, o, n in zip(rows, layout.offsets, layout.lengths, strict=False):
        if row.shape[0] < n - 1:
            raise ValueError(f"a row of {row.shape[0]} predictions for a sequence of {n} tokens")
        out[o:o + n - 1] = row[: n - 1]
    return out.unsqueeze(0)
