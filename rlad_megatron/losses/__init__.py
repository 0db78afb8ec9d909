"""RL and distillation losses: pure tensor functions returning ``(loss, metrics)``."""

from rlad_megatron.losses.agg import aggregate
from rlad_megatron.losses.gkd import gkd_loss, vocab_parallel_divergence
from rlad_megatron.losses.kdrl import kdrl_loss
from rlad_megatron.losses.kl import kl_estimate
from rlad_megatron.losses.sft import sft_loss
from rlad_megatron.losses.trrd import grpo_loss, trrd_loss

__all__ = [
    "aggregate",
    "gkd_loss",
    "grpo_loss",
    "kdrl_loss",
    "kl_estimate",
    "sft_loss",
    "trrd_loss",
    "vocab_parallel_divergence",
]
