"""The frozen teacher: a second GPTModel in the same processes with its own TP/PP process groups.

No DDP wrapper, no optimizer, no grad buffers: parameters have `requires_grad=False` and the module
stays in eval mode. It only scores the student's tokens (one forward pass, `compute_logprobs`).
"""

from __future__ import annotations

import torch

from rlad_megatron import platform
from rlad_megatron.models.builder import Model, build_model
from rlad_megatron.models.families import ModelSpec


def build_teacher(spec: ModelSpec, *, tp: int, pp: int = 1, params_dtype: torch.dtype = torch.float32,
                  padded_vocab: int | None = None, make_vocab_size_divisible_by: int = 128,
                  use_te: bool | None = None, **config_overrides) -> Model:
    """Build the teacher on fresh process groups (`platform.make_process_groups`). Collective: every
    rank calls it. Weights are random until loaded (`convert.load_hf_into_megatron` or a checkpoint)."""
    pg = platform.make_process_groups(tp, pp)
    teacher = build_model(spec, pg=pg, params_dtype=params_dtype, padded_vocab=padded_vocab,
                          make_vocab_size_divisible_by=make_vocab_size_divisible_by, use_te=use_te,
                          **config_overrides)
    freeze(teacher)
    return teacher


def freeze(model: Model) -> None:
    model.module.eval()
    model.module.requires_grad_(False)
    for p in model.module.parameters():
        p.grad = None


def check_frozen(model: Model) -> None:
    """The teacher contract: eval mode, no trainable parameter, no gradient anywhere."""
    if model.module.training:
        raise RuntimeError("teacher is in training mode")
    bad = [n for n, p in model.module.named_parameters() if p.requires_grad or p.grad is not None]
    if bad:
        raise RuntimeError(f"teacher parameters must be frozen, found trainable/grad: {bad[:3]}")
