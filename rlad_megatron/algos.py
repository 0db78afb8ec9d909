"""Which loss each `--algo` optimises, on one micro-batch of the student's vocab-parallel logits.

    grpo : clipped surrogate on pi_S / pi_old                         (trrd_loss, alpha = 1)
    rlad : clipped surrogate on pi_S / (pi_old^a * pi_T^(1-a))        (trrd_loss, alpha = --alpha)
    kdrl : grpo + kl_coef * KL(pi_S || pi_T) on sampled tokens        (kdrl_loss, k1/k2/k3)
    gkd  : full-vocabulary KL to the teacher [+ grpo]                  (gkd_loss, teacher logits in the step)
    sft  : masked NLL of the batch tokens (offline distillation)       (sft_loss)
"""

from __future__ import annotations

from argparse import Namespace

import torch

from rlad_megatron.losses import kdrl_loss, sft_loss, trrd_loss
from rlad_megatron.models.forward import next_tokens
from rlad_megatron.ops.logprobs import vocab_parallel_logprobs

ALGOS = ("grpo", "rlad", "kdrl", "gkd", "sft")
NEEDS_TEACHER_LOGP = {"rlad", "kdrl"}
NEEDS_TEACHER = {"rlad", "kdrl", "gkd"}
IS_RL = {"grpo", "rlad", "kdrl", "gkd"}


def token_advantages(mb: dict, args: Namespace) -> torch.Tensor:
    """`[b, L-1]` advantages; with `--tis-cap` the truncated importance weight min(pi_old/pi_rollout, C)
    multiplies them (for w > 0 that equals weighting the per-token clipped loss)."""
    adv = mb["advantages"][:, None].expand_as(mb["response_mask"])
    if args.tis_cap:
        w = torch.exp(mb["old_logp"] - mb["rollout_logp"]).clamp(max=args.tis_cap)
        adv = adv * torch.where(mb["response_mask"] > 0, w, torch.ones_like(w))
    return adv


def micro_batch_loss(mb: dict, logits: torch.Tensor, *, args: Namespace, tp_group, vocab_size: int,
                     teacher_logits_fn=None) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch. `logits [b, L, vocab/tp]` from the student's last stage; `mb` holds the
    `RolloutBatch` rows as tensors. Returns (scalar loss, metrics)."""
    logp, entropy = vocab_parallel_logprobs(logits, next_tokens(mb["tokens"]), group=tp_group,
                                            temperature=args.rollout_temperature, vocab_size=vocab_size,
                                            with_entropy=True)
    logp, entropy = logp[:, :-1], entropy[:, :-1]
    mask = mb["response_mask"]
    common = dict(eps_low=args.eps_clip_low, eps_high=args.eps_clip_high, agg=args.loss_agg)
    if args.algo == "sft":
        loss, metrics = sft_loss(logp, mask, agg=args.loss_agg)
    elif args.algo in ("grpo", "rlad"):
        alpha = 1.0 if args.algo == "grpo" else args.alpha
        loss, metrics = trrd_loss(
            logp, mb["old_logp"], mb.get("teacher_logp") if alpha < 1 else None, token_advantages(mb, args), mask,
            alpha=alpha, teacher_clamp=args.teacher_clamp, dual_clip=args.dual_clip,
            ref_logp=mb.get("ref_logp"), beta=args.ref_kl_coef, kl_estimator=args.kl_estimator, **common)
    elif args.algo == "kdrl":
        loss, metrics = kdrl_loss(logp, mb["old_logp"], mb["teacher_logp"], token_advantages(mb, args), mask,
                                  kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, **common)
    elif args.algo == "gkd":
        from rlad_megatron.losses import gkd_loss

        full_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)  # the last position predicts nothing
        loss, metrics = gkd_loss(logits, teacher_logits_fn(mb["tokens"]), full_mask, group=tp_group,
                                 divergence=args.gkd_divergence, temperature=args.rollout_temperature,
                                 vocab_size=vocab_size, agg=args.loss_agg)
        if args.gkd_rl_coef:
            rl, rl_metrics = trrd_loss(logp, mb["old_logp"], None, token_advantages(mb, args), mask, alpha=1.0,
                                       **common)
            loss = loss + args.gkd_rl_coef * rl
            metrics = {**metrics, **{f"rl/{k}": v for k, v in rl_metrics.items()}}
    else:
        raise ValueError(f"--algo {args.algo!r}: expected one of {ALGOS}")
    if args.entropy_coef:
        ent = (entropy * mask).sum() / mask.sum().clamp(min=1)
        loss = loss - args.entropy_coef * ent
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["entropy"] = float(((entropy * mask).sum() / mask.sum().clamp(min=1)).detach())
    return loss, metrics
