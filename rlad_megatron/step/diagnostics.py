"""Per-step diagnostics: phase timings, non-finite checks, train-vs-rollout and teacher/student log-prob gaps."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from rlad_megatron.batch import RolloutBatch


class NonFiniteError(RuntimeError):
    """A reward, log-prob, loss or gradient of a step is NaN/inf; raised on every rank together."""


class PhaseTimer:
    """Wall-clock per phase of a step: `perf/<phase>_s`, `perf/step_s`, `perf/tokens_per_s`."""

    def __init__(self) -> None:
        self.t0, self.phases = time.perf_counter(), {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self, tokens: float) -> dict:
        total = time.perf_counter() - self.t0
        return {**{f"perf/{k}_s": v for k, v in self.phases.items()}, "perf/step_s": total,
                "perf/tokens_per_s": tokens / total}


def check_finite(x: torch.Tensor, mask: torch.Tensor, what: str, step: int) -> None:
    """`x` is identical on every rank, so every rank raises together. Steps are counted from 1, as logged."""
    bad = ~torch.isfinite(x) & (mask > 0)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(f"step {step}: non-finite {what} ({int(bad.sum())} tokens, first at sequence {row}, "
                             f"position {col}); lower --lr or check the checkpoint")


def rollout_gap(batch: RolloutBatch) -> dict:
    """Train-vs-rollout log-prob gap: engine vs Megatron for the same weights."""
    m = batch.response_mask > 0
    return {"rollout/logp_gap_abs": float((batch.old_logp - batch.rollout_logp)[m].abs().mean())}


def teacher_gap(batch: RolloutBatch) -> dict:
    """Mean log pi_S - log pi_T over the student's own tokens (how far the student is from the teacher)."""
    m = batch.response_mask > 0
    return {"teacher/logp_student_minus_teacher": float((batch.old_logp - batch.teacher_logp)[m].mean())}
