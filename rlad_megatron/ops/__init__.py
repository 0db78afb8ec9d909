"""Tensor-parallel aware numerical ops."""

from rlad_megatron.ops.logprobs import vocab_parallel_logprobs

__all__ = ["vocab_parallel_logprobs"]
