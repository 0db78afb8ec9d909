"""Megatron -> HF: a streaming iterator of full HF-named tensors (what the rollout weight sync consumes)
and a sharded safetensors writer on top of it.

`export_hf_weights` is collective. Each tensor is built by its owning pipeline stage (TP shards
all-gathered over `model.pg.tp`), cast to the HF dtype, then broadcast over `model.pg.pp`, so every rank
yields the same sequence of (name, full tensor). Order: embeddings, layers 0..L-1 (HF order within a
layer), final norm, lm_head (absent when tied, as in HF checkpoints).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from rlad_megatron.convert.common import Rule, atomic_dir, gather_tp
from rlad_megatron.convert.hf_to_megatron import bind_parameters, check_same_model, shard_context
from rlad_megatron.convert.registry import mapping_for
from rlad_megatron.models.builder import Model
from rlad_megatron.models.families import ModelSpec, spec_from_hf_config

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX_NAME = "model.safetensors.index.json"
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_dtype(spec_or_config: ModelSpec | dict) -> torch.dtype | None:
    """The dtype named by an HF config (`dtype`, or `torch_dtype` before transformers 5), if any."""
    cfg = spec_or_config.hf_config if isinstance(spec_or_config, ModelSpec) else spec_or_config
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None:
        return None
    dtype = _DTYPES.get(str(name).removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"config.json: dtype {name!r} is not one of {sorted(_DTYPES)}")
    return dtype


def _layer_owners(model: Model) -> dict[int, int]:
    """Global layer index -> pipeline rank holding it (one all_gather_object over the PP group)."""
    mine = [layer.layer_number - 1 for layer in model.module.decoder.layers]
    if model.pp == 1:
        return dict.fromkeys(mine, 0)
    per_stage: list[list[int]] = [[] for _ in range(model.pp)]
    dist.all_gather_object(per_stage, mine, group=model.pg.pp)
    return {layer: stage for stage, layers in enumerate(per_stage) for layer in layers}


def _plan(model: Model) -> Iterator[tuple[int, Rule, int | None]]:
    """(owning PP rank, rule, global layer) for every exported parameter, in HF order."""
    spec = model.spec
    mapping = mapping_for(spec)
    owners = _layer_owners(model)
    if sorted(owners) != list(range(spec.num_layers)):
        raise RuntimeError(f"pipeline stages hold layers {sorted(owners)}, expected 0..{spec.num_layers - 1}")
    for rule in mapping.embedding:
        yield 0, rule, None
    for layer in range(spec.num_layers):
        for rule in mapping.layer:
            yield owners[layer], rule, layer
    for rule in mapping.final:
        yield model.pp - 1, rule, None


def export_hf_weights(
    model: Model, dtype: torch.dtype | None = None, *, broadcast_pp: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole model; collective over the model's TP and PP groups.

    `dtype` defaults to the HF config's dtype (else the parameters' dtype); vocab padding is stripped.
    With `broadcast_pp=True` every rank yields every tensor; with False each rank yields only what its
    own pipeline stage owns (no PP communication). Tensors live on the parameters' device and may share
    storage with the parameters (tp=1, same dtype): copy them if kept across optimizer steps. At most
    one parameter's full tensors are created per step, so memory stays bounded by the largest one.
    """
    spec = model.spec
    dtype = dtype or hf_dtype(spec) or model.config.params_dtype
    ctx = shard_context(model)
    device = next(model.module.parameters()).device
    local = {bp.hf[0]: bp for bp in bind_parameters(model) if bp.rule.export}
    pp_rank = model.pp_rank
    for owner, rule, layer in _plan(model):
        if not (rule.when(spec) and rule.export):
            continue
        names = [h.format(i=layer) for h in rule.hf]
        if owner == pp_rank:
            bp = local.get(names[0])
            if bp is None:
                raise RuntimeError(f"pipeline rank {pp_rank} should hold the parameter for {names[0]}")
            with torch.no_grad():
                shards = gather_tp(bp.param.detach(), model.pg.tp if rule.layout.gathered else None)
                tensors = [t.to(dtype) for t in rule.layout.merge(shards, ctx)]
        elif broadcast_pp:
            tensors = [torch.empty(shape, dtype=dtype, device=device) for shape in rule.shapes(spec)]
        else:
            continue
        if broadcast_pp and model.pp > 1:
            src = dist.get_global_rank(model.pg.pp, owner)
            for t in tensors:
                dist.broadcast(t, src=src, group=model.pg.pp)
        yield from zip(names, tensors, strict=True)
        del tensors


class _ShardWriter:
    """Packs tensors into safetensors files of at most `max_bytes` (a larger tensor gets its own file)."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.files: list[list[str]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.out / f"part-{len(self.files):05d}.safetensors", metadata={"format": "pt"})
            self.files.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Rename parts to HF's `model-0000k-of-0000n.safetensors` and write the index."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for k, names in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.out / f"part-{k:05d}.safetensors").rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _metadata_files(src: Path) -> list[Path]:
    """Every top-level file of `src` except weights and weight indexes."""
    return [f for f in sorted(src.iterdir())
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json")]


def copy_hf_metadata(template: Path, out: Path, tokenizer_dir: Path | None = None) -> None:
    """Copy config.json, generation_config.json, tokenizer and chat-template files: every top-level file
    of the template except weights and the weight index; then, with `tokenizer_dir`, its tokenizer files (every
    such file except the model configs), replacing the template's."""
    for f in _metadata_files(template):
        shutil.copy2(f, out / f.name)
    if tokenizer_dir is not None:
        for f in _metadata_files(Path(tokenizer_dir)):
            if f.name not in MODEL_CONFIG_FILES:
                shutil.copy2(f, out / f.name)


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def save_hf_checkpoint(
    model: Model,
    hf_template_dir: str | Path,
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write the model as an HF checkpoint: sharded safetensors + index, plus the template's config,
    generation config and tokenizer files (the tokenizer files of `tokenizer_dir` when given). Collective on every
    rank; global rank 0 writes.

    The output appears atomically (temp dir + rename); on any error nothing is left at `out_dir`, and
    every rank raises. `dtype` defaults to the template config's dtype. The template must describe the
    same model (ValueError otherwise).
    """
    template, out = Path(hf_template_dir), Path(out_dir)
    template_cfg = spec_from_hf_config(template)
    check_same_model(model.spec, template_cfg, str(template / "config.json"))
    dtype = dtype or hf_dtype(template_cfg) or hf_dtype(model.spec) or model.config.params_dtype
    writer = not dist.is_initialized() or dist.get_rank() == 0
    with atomic_dir(out, overwrite=overwrite, enabled=writer) as tmp:
        error: BaseException | None = None
        shards = _ShardWriter(tmp, max_shard_bytes) if writer else None
        for name, tensor in export_hf_weights(model, dtype):
            if shards is not None and error is None:
                try:
                    shards.add(name, tensor)
                except Exception as e:  # noqa: BLE001 - keep draining: the other ranks are still in collectives
                    error = e
        if shards is not None and error is None:
            try:
                shards.finish()
                copy_hf_metadata(template, tmp, Path(tokenizer_dir) if tokenizer_dir else None)
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = e
        if _any_rank(error is not None):
            if error is not None:
                raise error
            raise RuntimeError("save_hf_checkpoint failed on rank 0 (see its log); nothing was written")
    if dist.is_initialized():
        dist.barrier()
    return out
