"""`rlad_megatron.packing` (pure) and the THD `PackedSeqParams` built from it (CPU, one process)."""

from __future__ import annotations

import math

import pytest
import torch

from rlad_megatron import packing


def long_tailed(n: int = 256, median: float = 3000.0, seed: int = 0) -> list[int]:
    """Lognormal lengths with the given median, capped at 8x the median (reasoning rollouts)."""
    g = torch.Generator().manual_seed(seed)
    x = (math.log(median) + 1.0 * torch.randn(n, generator=g)).exp().clamp(1, 8 * median).round()
    return [int(v) for v in x]


@pytest.mark.parametrize("dp", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_respects_budget_and_balances_dp(dp, seed):
    lengths = long_tailed(seed=seed)
    budget = 8 * 3000
    assert max(lengths) == budget  # the tail reaches the cap: the budget is tight for some packs
    plan = packing.plan_micro_batches(lengths, dp, budget)
    assert len(plan) == dp
    seen = sorted(i for rank in plan for mb in rank for i in mb)
    assert seen == list(range(len(lengths))), "every sequence exactly once"
    assert all(sum(lengths[i] for i in mb) <= budget for rank in plan for mb in rank)
    per_rank = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert max(per_rank) / (sum(per_rank) / dp) <= 1.05, per_rank
    # first-fit decreasing needs at most ~11/9 of the lower bound of packs on each rank
    for tokens, rank in zip(per_rank, plan, strict=True):
        assert len(rank) <= math.ceil(11 / 9 * math.ceil(tokens / budget)) + 1
    assert packing.plan_micro_batches(lengths, dp, budget) == plan, "deterministic"


def test_plan_errors():
    with pytest.raises(ValueError, match=r"a sequence of 10 tokens \(prompt \+ response\) exceeds "
                                         r"--max-tokens-per-gpu 9; raise --max-tokens-per-gpu to at least 10"):
        packing.plan_micro_batches([5, 10, 3], 1, 9)
    with pytest.raises(ValueError, match="2 sequences cannot fill 4 data-parallel ranks"):
        packing.plan_micro_batches([5, 6], 4, 100)
    with pytest.raises(ValueError, match="--max-tokens-per-gpu must be >= 1"):
        packing.plan_micro_batches([5], 1, 0)


def test_balanced_partition_small_cases():
    assert packing.balanced_partition([5, 5, 5, 5], 2) in ([[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 3], [1, 2]])
    parts = packing.balanced_partition([100, 1, 1, 1], 3)
    assert sorted(len(p) for p in parts) == [1, 1, 2] and [0] in parts  # never an empty rank
    # Karmarkar-Karp's textbook example: differencing gives 16 / 14 (the optimum is 15 / 15)
    parts = packing.balanced_partition([8, 7, 6, 5, 4], 2)
    assert sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts) == [14, 16]


def test_loss_scale_is_exact_for_any_split():
    """Σ_ranks Σ_mb (loss_sum_mb * scale_r) / n_mb_r / dp == total / D whatever the per-rank counts."""
    sums = [[1.0, 2.0, 3.0], [4.0], [0.5, 0.5]]  # 3 DP ranks with 3, 1, 2 micro-batches
    dp, denom = len(sums), 7.0
    got = sum(s * packing.loss_scale(len(r), dp, denom) / len(r) / dp for r in sums for s in r)
    assert got == pytest.approx(sum(map(sum, sums)) / denom, rel=1e-15)
    with pytest.raises(ValueError):
        packing.loss_scale(0, 1, 1.0)


def test_layout_and_views():
    lay = packing.pack_layout([3, 2, 4], multiple=4)
    assert (lay.total, lay.tokens, lay.offsets, lay.num_predictions) == (12, 9, (0, 3, 5, 9), 6)
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9])]
    tok = packing.pack_sequences(seqs, lay, pad_id=0)
    assert tok.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]]
    assert packing.packed_position_ids(lay).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert packing.segment_ids(lay).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert packing.packed_targets(tok, lay).tolist() == [[2, 3, 0, 5, 0, 7, 8, 9, 0, 0, 0, 0]]
    assert [t.tolist() for t in packing.unpack_predictions(packing.packed_targets(tok, lay), lay)] == \
        [[2, 3], [5], [7, 8, 9]]
    rows = torch.arange(15.0).view(3, 5)  # prediction-aligned rows of a padded batch (width L_max - 1 = 5 > needed)
    packed = packing.pack_predictions(rows, lay, fill=-1.0)
    assert packed.tolist() == [[0, 1, -1, 5, -1, 10, 11, 12, -1, -1, -1, -1]]
    back = packing.unpack_predictions(packed, lay)
    assert [b.tolist() for b in back] == [[0, 1], [5], [10, 11, 12]]
    assert packing.thd_cu_seqlens(lay).tolist() == [0, 3, 5, 9, 12]
    assert packing.thd_cu_seqlens(packing.pack_layout([3, 2])).tolist() == [0, 3, 5]  # no padding segment
    with pytest.raises(ValueError, match="do not match the layout"):
        packing.pack_sequences(seqs[:2], lay)


def test_block_causal_mask():
    lay = packing.pack_layout([2, 3], multiple=3)  # 5 tokens + 1 padding
    mask = packing.block_causal_mask(lay)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    allowed = (~mask[0, 0]).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("tp,fp8,expected", [(1, False, 128), (2, False, 256), (4, True, 512)])
def test_thd_pad_multiple(tp, fp8, expected):
    assert packing.thd_pad_multiple(tp, fp8) == expected
    assert expected % 16 == 0 and expected % tp == 0


def test_thd_packed_seq_params():
    """The TE path's PackedSeqParams (constructible without TE): cu_seqlens with a trailing padding segment."""
    from rlad_megatron.models.packed import thd_params

    lengths = [300, 17, 90]
    lay = packing.pack_layout(lengths, packing.thd_pad_multiple(2))
    assert lay.total == 512
    p = thd_params(lay)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.dtype == torch.int32 and p.cu_seqlens_q.tolist() == [0, 300, 317, 407, 512]
    assert p.cu_seqlens_kv is p.cu_seqlens_q
    assert p.max_seqlen_q == p.max_seqlen_kv == 300
    assert p.cu_seqlens_q_padded is None  # the padding is its own segment: no per-sequence padding
