"""Megatron-core GPT models built from Hugging Face configs."""

from rlad_megatron.models.families import ModelSpec, padded_vocab_size, spec_from_hf_config, supported_architectures

__all__ = ["ModelSpec", "padded_vocab_size", "spec_from_hf_config", "supported_architectures"]
