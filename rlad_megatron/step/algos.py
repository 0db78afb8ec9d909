"""One table of the algorithms (`--algo`): what each needs from the step and which loss it optimises.

    grpo : clipped surrogate on pi_S / pi_old                         (trrd_loss, alpha = 1)
    rlad : clipped surrogate on pi_S / (pi_old^a * pi_T^(1-a))        (trrd_loss, alpha = --alpha)
    kdrl : grpo + kl_coef * KL(pi_S || pi_T) on sampled tokens        (kdrl_loss, k2/k3)
    gkd  : full-vocabulary KL to the teacher [+ gkd_rl_coef * grpo]    (gkd_loss, teacher logits in the step)
    sft  : masked NLL of the batch tokens at T = 1 (offline distil.)   (sft_loss)

Every term of a loss is aggregated with the same `--loss-agg` (the entropy bonus too), so the update's
normalisation by global sequence / token counts (`step.update`) is exact for the whole loss. `--dual-clip` applies
to every PPO-style term (grpo, rlad, kdrl, the RL term of gkd). The loss functions take typed micro-batches and a
`LossConfig` built once from the flags; nothing here reads an argparse Namespace.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlad_megatron.advantages import broadcast_to_tokens
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.losses import aggregate, gkd_loss, kdrl_loss, sft_loss, trrd_loss


@dataclass(frozen=True)
class LossConfig:
    """The loss hyper-parameters of a run (`--algo` and the RLAD / baseline flags)."""

    algo: str
    temperature: float = 1.0  # rollout temperature: the policy log-probs of RL losses are taken at it
    alpha: float = 0.5
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    teacher_clamp: float | None = 1.0
    agg: str = "seq-mean-token-mean"
    kl_coef: float = 1e-3
    kl_estimator: str = "k2"
    ref_kl_coef: float = 0.0
    entropy_coef: float = 0.0
    gkd_divergence: str = "reverse"
    gkd_rl_coef: float = 0.0
    tis_cap: float | None = None

    @classmethod
    def from_args(cls, args: Namespace) -> LossConfig:
        return cls(algo=args.algo, temperature=args.rollout_temperature, alpha=args.alpha,
                   eps_low=args.eps_clip_low, eps_high=args.eps_clip_high, dual_clip=args.dual_clip,
                   teacher_clamp=args.teacher_clamp, agg=args.loss_agg, kl_coef=args.kl_coef,
                   kl_estimator=args.kl_estimator, ref_kl_coef=args.ref_kl_coef, entropy_coef=args.entropy_coef,
                   gkd_divergence=args.gkd_divergence, gkd_rl_coef=args.gkd_rl_coef, tis_cap=args.tis_cap)

    @property
    def policy_temperature(self) -> float:
        """The temperature of the student's log-probs in the loss: the sampler's for RL, 1 for SFT's plain NLL."""
        return 1.0 if self.algo == "sft" else self.temperature


@dataclass
class PolicyOutput:
    """The student's forward on one micro-batch, at `LossConfig.policy_temperature`."""

    logp: Tensor  # [b, L-1] log pi_S of the next token
    entropy: Tensor  # [b, L-1]
    logits: Tensor | None = None  # [b, L, vocab/tp], for losses over the full vocabulary (gkd)


@dataclass
class LossContext:
    """What a loss may need beyond the micro-batch: the student's TP group and true vocab, the teacher's logits."""

    tp_group: object = None
    vocab_size: int | None = None
    teacher_logits: Callable[[Tensor], Tensor] | None = None  # tokens [b, L] -> [b, L, vocab/tp]


LossFn = Callable[[RolloutBatch, PolicyOutput, LossConfig, LossContext], tuple[Tensor, dict]]


def token_advantages(mb: RolloutBatch, cfg: LossConfig) -> Tensor:
    """`[b, L-1]` advantages on the response tokens; with `--tis-cap` the truncated importance weight
    min(pi_old / pi_rollout, C) multiplies them (for w > 0 that equals weighting the per-token clipped loss)."""
    adv = broadcast_to_tokens(mb.advantages, mb.response_mask)
    if cfg.tis_cap:
        w = torch.exp(mb.old_logp - mb.rollout_logp).clamp(max=cfg.tis_cap)
        adv = adv * torch.where(mb.response_mask > 0, w, torch.ones_like(w))
    return adv


def _policy_terms(cfg: LossConfig) -> dict:
    return dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, agg=cfg.agg, dual_clip=cfg.dual_clip)


def trrd(mb: RolloutBatch, out: PolicyOutput, cfg: LossConfig, ctx: LossContext) -> tuple[Tensor, dict]:
    alpha = 1.0 if cfg.algo == "grpo" else cfg.alpha
    return trrd_loss(out.logp, mb.old_logp, mb.teacher_logp if alpha < 1 else None, token_advantages(mb, cfg),
                     mb.response_mask, alpha=alpha, teacher_clamp=cfg.teacher_clamp, ref_logp=mb.ref_logp,
                     beta=cfg.ref_kl_coef, kl_estimator=cfg.kl_estimator, **_policy_terms(cfg))


def kdrl(mb: RolloutBatch, out: PolicyOutput, cfg: LossConfig, ctx: LossContext) -> tuple[Tensor, dict]:
    return kdrl_loss(out.logp, mb.old_logp, mb.teacher_logp, token_advantages(mb, cfg), mb.response_mask,
                     kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, **_policy_terms(cfg))


def gkd(mb: RolloutBatch, out: PolicyOutput, cfg: LossConfig, ctx: LossContext) -> tuple[Tensor, dict]:
    mask = mb.response_mask
    full_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)  # the last position predicts nothing
    loss, metrics = gkd_loss(out.logits, ctx.teacher_logits(mb.tokens), full_mask, group=ctx.tp_group,
                             divergence=cfg.gkd_divergence, temperature=cfg.temperature,
                             vocab_size=ctx.vocab_size, agg=cfg.agg)
    if cfg.gkd_rl_coef:
        rl, rl_metrics = trrd_loss(out.logp, mb.old_logp, None, token_advantages(mb, cfg), mask, alpha=1.0,
                                   **_policy_terms(cfg))
        loss = loss + cfg.gkd_rl_coef * rl
        metrics = {**metrics, **{f"rl/{k}": v for k, v in rl_metrics.items()}}
    return loss, metrics


def sft(mb: RolloutBatch, out: PolicyOutput, cfg: LossConfig, ctx: LossContext) -> tuple[Tensor, dict]:
    return sft_loss(out.logp, mb.response_mask, agg=cfg.agg)


@dataclass(frozen=True)
class Algo:
    """What one `--algo` needs from the step, and its loss."""

    name: str
    loss: LossFn
    rl: bool  # learns from reward-scored rollouts of the student (else from SFT batches)
    teacher_logp: bool = False  # the teacher scores the student's tokens (one forward, no backward)
    teacher_logits: bool = False  # the loss needs the teacher's full distributions (same TP, PP = 1)
    teacher_traces: bool = False  # `--sft-source teacher`: the teacher generates the training traces

    def needs_teacher(self, sft_source: str = "teacher") -> bool:
        return self.teacher_logp or self.teacher_logits or (self.teacher_traces and sft_source == "teacher")


ALGOS: dict[str, Algo] = {
    "grpo": Algo("grpo", trrd, rl=True),
    "rlad": Algo("rlad", trrd, rl=True, teacher_logp=True),
    "kdrl": Algo("kdrl", kdrl, rl=True, teacher_logp=True),
    "gkd": Algo("gkd", gkd, rl=True, teacher_logits=True),
    "sft": Algo("sft", sft, rl=False, teacher_traces=True),
}


def micro_batch_loss(mb: RolloutBatch, out: PolicyOutput, cfg: LossConfig,
                     ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
    """`--algo`'s loss on one micro-batch plus `- entropy_coef * agg(entropy)`. Returns (scalar loss, metrics)."""
    loss, metrics = ALGOS[cfg.algo].loss(mb, out, cfg, ctx)
    mask = mb.response_mask > 0
    entropy = aggregate(out.entropy, mask, cfg.agg)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["entropy"] = float(entropy.detach())
    return loss, metrics
