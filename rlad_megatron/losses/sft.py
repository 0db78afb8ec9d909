"""Masked negative log-likelihood for offline distillation (SFT on teacher outputs)."""

from __future__ import annotations

from torch import Tensor

from rlad_megatron.losses._checks import check_agg, check_logprobs, check_mask
from rlad_megatron.losses.agg import aggregate, masked_mean

__all__ = ["sft_loss"]


def sft_loss(logp: Tensor, mask: Tensor, *, agg: str = "token-mean") -> tuple[Tensor, dict[str, Tensor]]:
    """``agg(-logp)`` over ``mask``; ``logp``/``mask`` are ``[batch, resp_len]`` (target-token log-probs).

    Metrics: ``nll`` (token mean), ``num_tokens``.
    """
    check_agg(agg)
    mask = check_mask(mask)
    check_logprobs("logp", logp, mask)
    loss = aggregate(-logp, mask, agg)
    return loss, {"loss": loss.detach().float(), "nll": masked_mean(-logp, mask), "num_tokens": mask.sum().float()}
