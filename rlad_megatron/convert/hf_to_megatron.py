"""Load an HF safetensors checkpoint into this rank's shard of a Megatron `GPTModel`.

Every rank validates the whole checkpoint from the safetensors headers first (names, shapes, config), so
a bad checkpoint raises the same `ValueError` on all ranks before any weight is copied. Then each
parameter of this rank's stage is filled from only the rows/columns its TP rank needs, one HF tensor
at a time.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
from safetensors import safe_open

from rlad_megatron.convert.common import TIED_LM_HEAD, FamilyMapping, Index, Rule, Shape, ShardContext
from rlad_megatron.convert.registry import mapping_for
from rlad_megatron.errors import UserError
from rlad_megatron.models.builder import Model
from rlad_megatron.models.families import ModelSpec, spec_from_hf_config

# ModelSpec fields that define the weights and the math (max_position_embeddings/init_std do not)
MODEL_FIELDS = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "qk_layernorm",
    "tie_word_embeddings",
)
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def check_same_model(expected: ModelSpec, found: ModelSpec, source: str) -> None:
    """ValueError listing every model-defining field where `found` (read from `source`) differs."""
    diffs = [f"{f}: model has {getattr(expected, f)!r}, {source} has {getattr(found, f)!r}"
             for f in MODEL_FIELDS if getattr(expected, f) != getattr(found, f)]
    if diffs:
        raise UserError(f"{source} is a checkpoint of a different model:\n  " + "\n  ".join(diffs))


def _open_safetensors(path: Path):
    """`safe_open(path)`; a truncated or corrupt file (safetensors checks the header against the file size) is a
    UserError naming it."""
    try:
        return safe_open(path, "pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError is not importable under a stable name
        raise UserError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt") from None


class SafetensorsCheckpoint:
    """Read-only view of an HF checkpoint dir (`model.safetensors` or a sharded index): names, header
    shapes and sliced reads, one tensor at a time. Use as a context manager."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.exists():
            try:
                self.files: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a safetensors index (expected JSON with a 'weight_map'; {e!r})") from None
        elif single.exists():
            with _open_safetensors(single) as f:
                self.files = {name: single.name for name in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            raise UserError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors HF checkpoints are supported)")
        self._stack = contextlib.ExitStack()
        self._open: dict[str, object] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._open:
            path = self.dir / file
            if not path.exists():
                raise UserError(f"{path}: missing (the index lists it for {name})")
            self._open[file] = self._stack.enter_context(_open_safetensors(path))
        return self._open[file]

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> Shape:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: Index = ()) -> torch.Tensor:
        """The tensor, or the `index` (a tuple of slices) of it, read without loading the rest."""
        if not index:
            return self._handle(name).get_tensor(name)
        return self._handle(name).get_slice(name)[index]


def expected_hf_tensors(spec: ModelSpec, mapping: FamilyMapping | None = None) -> dict[str, Shape]:
    """Every HF tensor name of the full model (all stages) with its shape."""
    mapping = mapping or mapping_for(spec)
    out: dict[str, Shape] = {}

    def add(rule: Rule, layer: int | None) -> None:
        for name, shape in zip(rule.hf, rule.shapes(spec), strict=True):
            out[name.format(i=layer)] = shape

    for rule in (*mapping.embedding, *mapping.final):
        if rule.when(spec):
            add(rule, None)
    for layer in range(spec.num_layers):
        for rule in mapping.layer:
            if rule.when(spec):
                add(rule, layer)
    return out


def check_hf_checkpoint(ckpt: SafetensorsCheckpoint, spec: ModelSpec, mapping: FamilyMapping | None = None) -> None:
    """ValueError naming missing, unexpected and wrongly shaped tensors (from the headers only)."""
    mapping = mapping or mapping_for(spec)
    expected = expected_hf_tensors(spec, mapping)
    ignored = [re.compile(p) for p in (*mapping.ignored_hf, *((TIED_LM_HEAD,) if spec.tie_word_embeddings else ()))]
    names = ckpt.names()
    problems = [f"missing tensor {n} (expected shape {list(s)})" for n, s in expected.items() if n not in names]
    problems += [f"unexpected tensor {n}" for n in sorted(names - expected.keys())
                 if not any(p.fullmatch(n) for p in ignored)]
    problems += [f"tensor {n} has shape {list(ckpt.shape(n))}, expected {list(s)}"
                 for n, s in expected.items() if n in names and ckpt.shape(n) != s]
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise UserError(f"{ckpt.dir} does not match the {spec.family} model:\n  " + "\n  ".join(problems[:20]) + more)


@dataclass(frozen=True)
class BoundParam:
    """One parameter of this rank with the rule that fills it and its HF names (layer index resolved)."""

    name: str
    param: torch.Tensor
    rule: Rule
    hf: tuple[str, ...]
    layer: int | None  # global 0-based layer index, None outside the decoder layers


def _find(rules: tuple[Rule, ...], name: str, spec: ModelSpec) -> Rule | None:
    return next((r for r in rules if name in r.mcore and r.when(spec)), None)


def bind_parameters(model: Model, mapping: FamilyMapping | None = None) -> list[BoundParam]:
    """This rank's parameters, each matched to its rule. ValueError for a parameter with no HF mapping."""
    spec = model.spec
    mapping = mapping or mapping_for(spec)
    layers = model.module.decoder.layers
    bound = []
    for name, param in model.module.named_parameters():
        m = _LAYER.fullmatch(name)
        if m:
            layer = layers[int(m.group(1))].layer_number - 1
            rule = _find(mapping.layer, m.group(2), spec)
        else:
            layer, rule = None, _find((*mapping.embedding, *mapping.final), name, spec)
        if rule is None:
            raise ValueError(f"Megatron parameter {name} has no HF mapping in the {spec.family} converter")
        bound.append(BoundParam(name, param, rule, tuple(h.format(i=layer) for h in rule.hf), layer))
    return bound


def shard_context(model: Model) -> ShardContext:
    return ShardContext(model.spec, model.tp, model.pg.tp.rank(), model.padded_vocab)


def iter_shards(model: Model, ckpt: SafetensorsCheckpoint) -> Iterator[tuple[BoundParam, torch.Tensor]]:
    """(parameter, this rank's shard of it read from `ckpt`), one parameter at a time."""
    ctx = shard_context(model)
    for bp in bind_parameters(model):
        shapes = bp.rule.shapes(model.spec)
        parts = [ckpt.read(n, idx) for n, idx in zip(bp.hf, bp.rule.layout.read_slices(shapes, ctx), strict=True)]
        shard = bp.rule.layout.to_shard(parts, ctx)
        if tuple(shard.shape) != tuple(bp.param.shape):  # a layout bug, not a user error
            raise RuntimeError(f"{bp.name}: built shard {list(shard.shape)} from {bp.hf}, "
                               f"parameter is {list(bp.param.shape)}")
        yield bp, shard


def load_hf_into_megatron(model: Model, hf_dir: str | Path) -> None:
    """Copy the HF checkpoint in `hf_dir` into this rank's shard of `model.module` (call on every rank).

    Checks `hf_dir/config.json` describes the same model and that the tensors are exactly the expected
    ones; raises ValueError naming the field/tensor otherwise. Padded vocab rows are set to zero; with
    tied embeddings and PP>1 the last stage's output-layer copy is filled from `model.embed_tokens`.
    """
    hf_dir = Path(hf_dir)
    spec = model.spec
    mapping = mapping_for(spec)
    check_same_model(spec, spec_from_hf_config(hf_dir), str(hf_dir / "config.json"))
    with SafetensorsCheckpoint(hf_dir) as ckpt, torch.no_grad():
        check_hf_checkpoint(ckpt, spec, mapping)
        for bp, shard in iter_shards(model, ckpt):
            bp.param.copy_(shard)
