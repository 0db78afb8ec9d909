"""Engine vs trainer log-prob parity: the check to run right after a weight sync.

`tail_logprobs` computes reference log-probs from full logits; `check_logprob_parity` compares them with any
engine's `score` (prefill log-probs) and raises `LogprobParityError` when they differ by more than `atol`, which
means a conversion or sync bug.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlad_megatron.rollout.base import WeightUpdateError


class LogprobParityError(WeightUpdateError):
    """Engine log-probs after a weight sync differ from the trainer's by more than the tolerance."""


def check_logprob_parity(engine, probe_ids: Sequence[Sequence[int]], reference_logprobs, atol: float = 2e-2, *,
                         prompt_lens: Sequence[int] | None = None, temperature: float = 1.0) -> float:
    """Max |engine log-prob - reference| over the probe tokens; raises `LogprobParityError` above `atol`.

    `reference_logprobs[i]`: the trainer's (Megatron forward) log-probs of the last `len(reference_logprobs[i])`
    tokens of `probe_ids[i]` (a list/1-D tensor per row, or a [rows, n] tensor); `prompt_lens` defaults to
    `len(probe) - len(reference)`. Use it right after a weight sync: a mismatch means a conversion or sync bug.
    """
    refs = [torch.as_tensor(r, dtype=torch.float64).reshape(-1) for r in reference_logprobs]
    if len(refs) != len(probe_ids):
        raise ValueError(f"{len(probe_ids)} probes but {len(refs)} reference rows")
    if prompt_lens is None:
        prompt_lens = [len(p) - len(r) for p, r in zip(probe_ids, refs, strict=True)]
    got = engine.score(probe_ids, prompt_lens, temperature=temperature)
    diff = 0.0
    for i, (g, r) in enumerate(zip(got, refs, strict=True)):
        if len(g) != r.numel():
            raise ValueError(f"probe {i}: engine scored {len(g)} tokens, reference has {r.numel()}")
        if r.numel():
            d = (torch.tensor(g, dtype=torch.float64) - r).abs().max().item()
            diff = max(diff, d if math.isfinite(d) else math.inf)
    if diff > atol:
        raise LogprobParityError(f"engine vs trainer log-probs differ by {diff:.3g} > {atol:g} after a weight sync "
                                 f"(version {getattr(engine, 'weight_version', '?')})")
    return diff


def tail_logprobs(logits: torch.Tensor, ids: torch.Tensor, n: int, temperature: float = 1.0) -> torch.Tensor:
    """Reference log-probs of the last `n` tokens of `ids` [L] from logits [L, V] (row t predicts token t+1)."""
    lp = torch.log_softmax(logits[-n - 1:-1].double() / temperature, -1)
    return lp.gather(-1, ids[-n:].long()[:, None])[:, 0]
