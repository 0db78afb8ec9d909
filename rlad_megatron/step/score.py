"""Score the rollout batch with the models before the update: old-policy log-probs (student forward), the teacher's
log-probs of the student's tokens (one teacher forward, no backward) and the reference's, all at the rollout
temperature and vocab-parallel; every rank gets the full `[N, L-1]` tensors. Also the teacher-logits function the
GKD loss calls inside the update."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlad_megatron import platform
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.models.builder import Model
from rlad_megatron.models.forward import compute_logprobs, position_ids
from rlad_megatron.step.algos import Algo, LossContext
from rlad_megatron.step.diagnostics import PhaseTimer, check_finite, rollout_gap, teacher_gap


def score_batch(batch: RolloutBatch, algo: Algo, *, student: Model, teacher: Model | None, reference: Model | None,
                temperature: float, micro_batch_size: int, step: int, timer: PhaseTimer) -> dict:
    """Fill `batch.old_logp` / `teacher_logp` / `ref_logp` as `algo` needs them; returns the diagnostics."""
    metrics: dict = {}

    def score(model: Model, phase: str, what: str) -> torch.Tensor:
        with timer(phase):
            logp, _ = compute_logprobs(model, batch.tokens, temperature=temperature, micro_batch_size=micro_batch_size)
        check_finite(logp, batch.response_mask, f"{what} log-probs", step + 1)
        return logp

    if algo.rl:
        batch.old_logp = score(student, "old_logp", "student")
        metrics |= rollout_gap(batch)
    if algo.teacher_logp:
        batch.teacher_logp = score(teacher, "teacher", "teacher")
        metrics |= teacher_gap(batch)
    if reference is not None:
        batch.ref_logp = score(reference, "ref_logp", "reference")
    return metrics


def teacher_logits_fn(teacher: Model, student: Model) -> Callable[[torch.Tensor], torch.Tensor]:
    """tokens `[b, L]` -> the teacher's `[b, L, vocab/tp]` logits, shard for shard like the student's (GKD compares
    full vocab shards, so the teacher needs the student's TP and both PP = 1)."""
    if teacher.tp != student.tp or teacher.pp != 1 or student.pp != 1:
        raise ValueError("--algo gkd compares full vocab shards: teacher and student need the same TP and PP=1")

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = tokens.to(platform.device())
            return teacher.module(tokens, position_ids(tokens), None)

    return fn


def loss_context(algo: Algo, student: Model, teacher: Model | None) -> LossContext:
    return LossContext(tp_group=student.pg.tp, vocab_size=student.spec.vocab_size,
                       teacher_logits=teacher_logits_fn(teacher, student) if algo.teacher_logits else None)
