"""HF <-> Megatron-core weight conversion: one name table per family (`qwen2`, `qwen3`, `llama`) behind a
registry, shared layouts in `common`, loaders/exporters for HF safetensors and model-only Megatron
distributed checkpoints. The same `export_hf_weights` iterator feeds the rollout weight sync."""

from rlad_megatron.convert.dist_checkpoint import (
    MegatronCheckpointMeta,
    build_model_from_megatron_checkpoint,
    check_model_checkpoint,
    load_megatron_checkpoint,
    padded_vocab_for,
    read_checkpoint_meta,
    read_megatron_meta,
    save_megatron_checkpoint,
)
from rlad_megatron.convert.hf_to_megatron import check_hf_checkpoint, expected_hf_tensors, load_hf_into_megatron
from rlad_megatron.convert.megatron_to_hf import export_hf_weights, hf_dtype, save_hf_checkpoint
from rlad_megatron.convert.registry import mapping_for, register, supported_families

__all__ = [
    "MegatronCheckpointMeta",
    "build_model_from_megatron_checkpoint",
    "check_hf_checkpoint",
    "check_model_checkpoint",
    "expected_hf_tensors",
    "export_hf_weights",
    "hf_dtype",
    "load_hf_into_megatron",
    "load_megatron_checkpoint",
    "mapping_for",
    "padded_vocab_for",
    "read_checkpoint_meta",
    "read_megatron_meta",
    "register",
    "save_hf_checkpoint",
    "save_megatron_checkpoint",
    "supported_families",
]
