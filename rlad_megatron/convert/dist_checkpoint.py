"""Model-only Megatron distributed checkpoints (`megatron.core.dist_checkpointing`, torch_dist format).

A checkpoint written at one TP/PP loads at another (dist_checkpointing reshards). Beside the shards we
keep `rlad_meta.json` (HF config, family, padded vocab, dtype, the writing layout) so a loader can rebuild
the model (`build_model_from_megatron_checkpoint`) and refuse a checkpoint of a different model.
Full training checkpoints (optimizer, RNG, step) live in `rlad_megatron.checkpoint` and reuse these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlad_megatron import platform
from rlad_megatron.ckpt_files import dist_checkpoint_problem, json_problem
from rlad_megatron.convert.common import atomic_dir
from rlad_megatron.convert.hf_to_megatron import check_same_model
from rlad_megatron.errors import UserError
from rlad_megatron.models.builder import Model, build_model
from rlad_megatron.models.families import spec_from_hf_config

META_NAME = "rlad_meta.json"
META_VERSION = 1


@dataclass(frozen=True)
class MegatronCheckpointMeta:
    """What `rlad_meta.json` records about the model in a Megatron checkpoint."""

    hf_config: dict
    family: str
    padded_vocab: int
    dtype: str  # "float32" / "bfloat16" / "float16": the params dtype the checkpoint was written with
    tp: int
    pp: int
    version: int = META_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """The raw `rlad_meta.json` dict (keys of `MegatronCheckpointMeta`; `["hf_config"]` rebuilds the spec)."""
    path = Path(ckpt_dir) / META_NAME
    if not path.exists() and ((Path(ckpt_dir) / "latest").exists() or any(Path(ckpt_dir).glob("iter_*"))):
        raise UserError(f"{ckpt_dir}: an rlad-train --save dir (training checkpoints), not a model-only checkpoint; "
                        "export it with tools/convert_megatron_to_hf.py, or resume from it with --load")
    if not path.exists():
        raise UserError(f"{ckpt_dir}: no {META_NAME}; not a checkpoint written by save_megatron_checkpoint "
                        "(or tools/convert_hf_to_megatron.py)")
    problem = json_problem(path)
    if problem:
        raise UserError(problem)
    meta = json.loads(path.read_text())
    if "format_version" in meta and "version" not in meta:
        raise UserError(f"{ckpt_dir}: a training checkpoint (rlad-train --save), not a model-only checkpoint; export "
                        "it with tools/convert_megatron_to_hf.py, or resume from it with --load")
    if meta.get("version") != META_VERSION:
        raise UserError(f"{path}: version {meta.get('version')!r}, this code reads version {META_VERSION}")
    return meta


def check_model_checkpoint(ckpt_dir: str | Path) -> MegatronCheckpointMeta:
    """Files-only check (no model built) of a model-only checkpoint: its meta and every shard the torch_dist index
    lists, complete. UserError naming the broken file."""
    meta = read_megatron_meta(ckpt_dir)
    problem = dist_checkpoint_problem(ckpt_dir)
    if problem:
        raise UserError(f"{problem} (incomplete checkpoint)")
    return meta


def read_megatron_meta(ckpt_dir: str | Path) -> MegatronCheckpointMeta:
    return MegatronCheckpointMeta(**read_checkpoint_meta(ckpt_dir))


def _sharded_state_dict(model: Model) -> dict:
    return model.module.sharded_state_dict(metadata={"dp_cp_group": model.pg.dp_cp})


def save_megatron_checkpoint(model: Model, ckpt_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model's weights as a torch_dist checkpoint plus `rlad_meta.json`; collective on every
    rank. The directory appears atomically (all ranks write a temp dir that rank 0 renames)."""
    from megatron.core import dist_checkpointing

    meta = MegatronCheckpointMeta(
        hf_config=model.spec.hf_config, family=model.spec.family, padded_vocab=model.padded_vocab,
        dtype=str(model.config.params_dtype).removeprefix("torch."), tp=model.tp, pp=model.pp,
    )
    with atomic_dir(ckpt_dir, overwrite=overwrite, enabled=platform.is_rank0()) as tmp:
        platform.barrier()  # rank 0 has created the temp dir
        dist_checkpointing.save(_sharded_state_dict(model), str(tmp))
        if platform.is_rank0():
            (tmp / META_NAME).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        platform.barrier()  # every rank has written its shards before rank 0 renames
    platform.barrier()
    return Path(ckpt_dir)


def padded_vocab_for(meta: MegatronCheckpointMeta, tp: int) -> int:
    """The checkpoint's padded vocab, which a model at `tp` must reuse; ValueError if it does not split."""
    if meta.padded_vocab % tp:
        raise UserError(
            f"the checkpoint's padded vocab {meta.padded_vocab} (written at TP={meta.tp}) is not divisible by "
            f"TP={tp}; convert again from HF with a --make-vocab-size-divisible-by that makes the padded vocab "
            f"a multiple of {tp}"
        )
    return meta.padded_vocab


def load_megatron_checkpoint(model: Model, ckpt_dir: str | Path) -> MegatronCheckpointMeta:
    """Load a checkpoint written by `save_megatron_checkpoint` (any TP/PP) into `model`; collective.

    ValueError if the checkpoint holds a different model or another padded vocab (build the model with
    `padded_vocab=padded_vocab_for(meta, tp)`, or use `build_model_from_megatron_checkpoint`).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta = check_model_checkpoint(ckpt_dir)
    check_same_model(model.spec, spec_from_hf_config(meta.hf_config), f"{ckpt_dir}/{META_NAME}")
    if padded_vocab_for(meta, model.tp) != model.padded_vocab:
        raise ValueError(
            f"{ckpt_dir}: padded vocab {meta.padded_vocab} but the model was built with {model.padded_vocab}; "
            "build it with padded_vocab=padded_vocab_for(meta, tp) (build_model_from_megatron_checkpoint does)"
        )
    state = dist_checkpointing.load(_sharded_state_dict(model), str(ckpt_dir), strict=StrictHandling.RAISE_ALL)
    model.module.load_state_dict(state, strict=True)
    return meta


def build_model_from_megatron_checkpoint(
    ckpt_dir: str | Path, *, params_dtype: torch.dtype | None = None, **build_kwargs
) -> Model:
    """Build the checkpoint's model for the current layout (`pg=` in `build_kwargs`, default the student
    groups) with the checkpoint's padded vocab and dtype, and load its weights."""
    meta = read_megatron_meta(ckpt_dir)
    pg = build_kwargs.pop("pg", None) or platform.student_process_groups()
    model = build_model(
        spec_from_hf_config(meta.hf_config), pg=pg, params_dtype=params_dtype or meta.torch_dtype,
        padded_vocab=padded_vocab_for(meta, pg.tp.size()), **build_kwargs,
    )
    load_megatron_checkpoint(model, ckpt_dir)
    return model
