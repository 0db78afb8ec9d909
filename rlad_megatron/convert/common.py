"""Shared HF <-> Megatron mapping pieces: tensor layouts (QKV grouping, [gate; up] fusion, TP splits, vocab
padding), the `Rule`/`FamilyMapping` tables the family modules fill in, and an atomic output directory.

A `Layout` says how one Megatron parameter is made from one or more HF tensors:
  * `read_slices` - which rows/columns of each full HF tensor this TP rank needs (so a loader reads 1/TP);
  * `to_shard`    - those slices -> this rank's Megatron shard;
  * `merge`       - every TP rank's shard (all-gathered) -> the full HF tensors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from rlad_megatron.errors import OutputExistsError
from rlad_megatron.models.families import ModelSpec

Shape = tuple[int, ...]
Index = tuple[slice, ...]


@dataclass(frozen=True)
class ShardContext:
    """What a layout needs to cut or merge: the model shape, TP size/rank and the padded vocab."""

    spec: ModelSpec
    tp: int
    tp_rank: int
    padded_vocab: int


# --------------------------------------------------------------------------------------------------
# tensor helpers
# --------------------------------------------------------------------------------------------------


def tp_range(n: int, tp: int, rank: int) -> slice:
    """Rows `[rank*n/tp, (rank+1)*n/tp)` of a dimension of size `n` (must divide)."""
    if n % tp:
        raise ValueError(f"dimension {n} is not divisible by tensor-model-parallel size {tp}")
    step = n // tp
    return slice(rank * step, (rank + 1) * step)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """HF q/k/v (weights `[n*d, h]` or biases `[n*d]`) -> Megatron's grouped layout: for each of the
    `num_groups` KV heads, its `nq/nkv` query heads, then its key head, then its value head."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, -1, *rest)
    k = k.reshape(num_groups, -1, *rest)
    v = v.reshape(num_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv` for the full (all TP ranks) fused tensor."""
    nq, nkv, d = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    rest = fused.shape[1:]
    grouped = fused.reshape(nkv, (nq // nkv + 2) * d, *rest)
    q, k, v = torch.split(grouped, [nq // nkv * d, d, d], dim=1)
    return (q.reshape(nq * d, *rest).contiguous(), k.reshape(nkv * d, *rest).contiguous(),
            v.reshape(nkv * d, *rest).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One TP shard of `linear_fc1`: this rank's gate rows, then this rank's up rows."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every TP rank's `linear_fc1` shard -> full HF gate_proj and up_proj."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])


def pad_vocab(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Append zero rows up to `num_rows` (Megatron's padded vocab)."""
    if rows.shape[0] == num_rows:
        return rows
    pad = rows.new_zeros((num_rows - rows.shape[0], *rows.shape[1:]))
    return torch.cat([rows, pad], dim=0)


def strip_vocab(rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return rows[:vocab_size]


def gather_tp(shard: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every TP rank's shard of one parameter (a one-element list without TP)."""
    if group is None or dist.get_world_size(group) == 1:
        return [shard]
    shard = shard.contiguous()
    out = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, shard, group=group)
    return out


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------


class Layout:
    """How one Megatron parameter relates to its HF tensor(s). Subclasses override the three methods."""

    gathered: bool = True  # False: every TP rank holds the full tensor, nothing to all-gather on export

    def read_slices(self, shapes: Sequence[Shape], ctx: ShardContext) -> list[Index]:
        raise NotImplementedError

    def to_shard(self, parts: Sequence[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, shards: Sequence[torch.Tensor], ctx: ShardContext) -> list[torch.Tensor]:
        raise NotImplementedError


class Replicated(Layout):
    """Norm weights: the same full tensor on every TP rank."""

    gathered = False

    def read_slices(self, shapes, ctx):
        return [()]

    def to_shard(self, parts, ctx):
        return parts[0]

    def merge(self, shards, ctx):
        return [shards[0]]


class Split(Layout):
    """Column-parallel (`dim=0`) or row-parallel (`dim=1`) linear weight, or a column-parallel bias."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def read_slices(self, shapes, ctx):
        return [(slice(None),) * self.dim + (tp_range(shapes[0][self.dim], ctx.tp, ctx.tp_rank),)]

    def to_shard(self, parts, ctx):
        return parts[0]

    def merge(self, shards, ctx):
        return [torch.cat(list(shards), dim=self.dim)]


class VocabRows(Layout):
    """Word embeddings / output layer: rows padded with zeros to the padded vocab, then split over TP."""

    def read_slices(self, shapes, ctx):
        rows = tp_range(ctx.padded_vocab, ctx.tp, ctx.tp_rank)
        return [(slice(min(rows.start, ctx.spec.vocab_size), min(rows.stop, ctx.spec.vocab_size)),)]

    def to_shard(self, parts, ctx):
        return pad_vocab(parts[0], ctx.padded_vocab // ctx.tp)

    def merge(self, shards, ctx):
        return [strip_vocab(torch.cat(list(shards), dim=0), ctx.spec.vocab_size)]


class QKV(Layout):
    """q/k/v projections (weights or biases) fused per query group; each TP rank holds nkv/tp groups."""

    def read_slices(self, shapes, ctx):
        return [(tp_range(shape[0], ctx.tp, ctx.tp_rank),) for shape in shapes]

    def to_shard(self, parts, ctx):
        return fuse_qkv(*parts, num_groups=ctx.spec.num_query_groups // ctx.tp)

    def merge(self, shards, ctx):
        return list(split_qkv(torch.cat(list(shards), dim=0), ctx.spec))


class GateUp(Layout):
    """gate_proj and up_proj fused into `linear_fc1` as [gate; up] per TP shard."""

    def read_slices(self, shapes, ctx):
        return [(tp_range(shape[0], ctx.tp, ctx.tp_rank),) for shape in shapes]

    def to_shard(self, parts, ctx):
        return fuse_gate_up(*parts)

    def merge(self, shards, ctx):
        return list(split_gate_up(shards))


# --------------------------------------------------------------------------------------------------
# HF shapes (from the spec, so every rank can validate a checkpoint and size broadcasts)
# --------------------------------------------------------------------------------------------------

ShapeFn = Callable[[ModelSpec], tuple[Shape, ...]]


def hidden_vec(s: ModelSpec) -> tuple[Shape, ...]:
    return ((s.hidden_size,),)


def head_vec(s: ModelSpec) -> tuple[Shape, ...]:
    return ((s.kv_channels,),)


def qkv_weights(s: ModelSpec) -> tuple[Shape, ...]:
    q, kv = s.num_attention_heads * s.kv_channels, s.num_query_groups * s.kv_channels
    return ((q, s.hidden_size), (kv, s.hidden_size), (kv, s.hidden_size))


def qkv_biases(s: ModelSpec) -> tuple[Shape, ...]:
    q, kv = s.num_attention_heads * s.kv_channels, s.num_query_groups * s.kv_channels
    return ((q,), (kv,), (kv,))


def out_proj(s: ModelSpec) -> tuple[Shape, ...]:
    return ((s.hidden_size, s.num_attention_heads * s.kv_channels),)


def gate_up(s: ModelSpec) -> tuple[Shape, ...]:
    return ((s.ffn_hidden_size, s.hidden_size),) * 2


def down_proj(s: ModelSpec) -> tuple[Shape, ...]:
    return ((s.hidden_size, s.ffn_hidden_size),)


def vocab_matrix(s: ModelSpec) -> tuple[Shape, ...]:
    return ((s.vocab_size, s.hidden_size),)


# --------------------------------------------------------------------------------------------------
# rules and family tables
# --------------------------------------------------------------------------------------------------


def always(spec: ModelSpec) -> bool:
    return True


def has_qkv_bias(spec: ModelSpec) -> bool:
    return spec.qkv_bias


def has_qk_norm(spec: ModelSpec) -> bool:
    return spec.qk_layernorm


def tied(spec: ModelSpec) -> bool:
    return spec.tie_word_embeddings


def untied(spec: ModelSpec) -> bool:
    return not spec.tie_word_embeddings


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter <-> its HF tensor(s).

    `mcore` lists alternative parameter names (local spec first, then Transformer Engine's fused-norm
    name); in layer rules they are relative to `decoder.layers.{i}.` and the HF names contain `{i}`, the
    global layer index. `export=False` marks a load-only copy (the tied output layer on the last stage).
    """

    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    layout: Layout
    shapes: ShapeFn
    when: Callable[[ModelSpec], bool] = always
    export: bool = True


@dataclass(frozen=True)
class FamilyMapping:
    """The name table of one architecture family: first-stage, per-layer and last-stage rules."""

    family: str
    embedding: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    final: tuple[Rule, ...]
    ignored_hf: tuple[str, ...] = ()  # regexes of HF tensors that are accepted and skipped


# The Llama-style decoder that Qwen2/Qwen3/Llama share; family modules add their optional rules.
EMBEDDING = (
    Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), VocabRows(), vocab_matrix),
)
ATTENTION = (
    Rule(("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
         ("model.layers.{i}.input_layernorm.weight",), Replicated(), hidden_vec),
    Rule(("self_attention.linear_qkv.weight",),
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), QKV(), qkv_weights),
    Rule(("self_attention.linear_proj.weight",), ("model.layers.{i}.self_attn.o_proj.weight",), Split(1), out_proj),
)
QKV_BIAS = (
    Rule(("self_attention.linear_qkv.bias",),
         ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
          "model.layers.{i}.self_attn.v_proj.bias"), QKV(), qkv_biases, when=has_qkv_bias),
)
QK_NORM = (
    Rule(("self_attention.q_layernorm.weight",), ("model.layers.{i}.self_attn.q_norm.weight",), Replicated(),
         head_vec, when=has_qk_norm),
    Rule(("self_attention.k_layernorm.weight",), ("model.layers.{i}.self_attn.k_norm.weight",), Replicated(),
         head_vec, when=has_qk_norm),
)
MLP = (
    Rule(("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
         ("model.layers.{i}.post_attention_layernorm.weight",), Replicated(), hidden_vec),
    Rule(("mlp.linear_fc1.weight",), ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
         GateUp(), gate_up),
    Rule(("mlp.linear_fc2.weight",), ("model.layers.{i}.mlp.down_proj.weight",), Split(1), down_proj),
)
FINAL = (
    Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",), Replicated(), hidden_vec),
    Rule(("output_layer.weight",), ("lm_head.weight",), VocabRows(), vocab_matrix, when=untied),
    # tied + PP>1: the last stage keeps its own copy of the embedding as the output layer
    Rule(("output_layer.weight",), ("model.embed_tokens.weight",), VocabRows(), vocab_matrix, when=tied,
         export=False),
)
# old checkpoints carry RoPE buffers; tied checkpoints sometimes still store lm_head.weight (a copy)
IGNORED_HF = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
TIED_LM_HEAD = r"lm_head\.weight"


# --------------------------------------------------------------------------------------------------
# atomic output directories
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool = False, enabled: bool = True) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out_dir`; on success rename it to `out_dir`, on error delete it.

    `enabled=False` (non-writing ranks) yields the same temp path and touches nothing.
    """
    out = Path(out_dir).resolve()
    tmp = out.parent / f".{out.name}.tmp"
    if out.exists() and not overwrite:  # checked on every rank (shared filesystem), so all ranks raise
        raise OutputExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    if not enabled:
        yield tmp
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
