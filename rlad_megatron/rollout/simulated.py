"""A simulated rollout engine: the cost model of a decoder without the model.

`SimulatedEngine` answers `generate` with seeded random tokens and spends `seconds_per_token` of wall-clock per
generated token, one request after the other (`time.sleep`, so it measures scheduling, not this machine's cores).
Response lengths are long-tailed: lognormal around `median_tokens`, capped at `max_new_tokens`. The length and the
tokens of row i depend only on `sampling.seed + i`, like the real engines. It is what `benchmarks/rollout_scaling.py`
and the dispatch tests drive; it holds no weights (`update_weights` accepts and drops them).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence

import torch

from rlad_megatron.rollout.base import Rollout, SamplingParams


def response_length(seed: int, median: float, sigma: float, cap: int) -> int:
    """Lognormal(log median, sigma) tokens, at least 1, at most `cap`."""
    return max(1, min(cap, round(median * math.exp(sigma * random.Random(seed).gauss(0.0, 1.0)))))


class SimulatedEngine:
    concurrency = 1  # one request at a time: its cost is additive

    def __init__(self, *, vocab_size: int = 32, seconds_per_token: float = 1e-4, median_tokens: float = 32.0,
                 sigma: float = 0.8) -> None:
        self.vocab_size, self.seconds_per_token = vocab_size, seconds_per_token
        self.median_tokens, self.sigma = median_tokens, sigma
        self._version = "default"
        self.generated_tokens = 0

    @property
    def weight_version(self) -> str:
        return self._version

    @property
    def update_dtype(self) -> None:
        return None

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        """One request: its rows one after the other, `seconds_per_token` per generated token (one sleep)."""
        out = []
        for i, p in enumerate(prompts):
            seed = (sampling.seed or 0) + i
            n = response_length(seed, self.median_tokens, self.sigma, sampling.max_new_tokens)
            rng = random.Random(seed * 7919 + 1)
            ids = [rng.randrange(self.vocab_size) for _ in range(n)]
            out.append(Rollout(prompt_ids=list(p), output_ids=ids, output_logprobs=[-1.0] * n,
                               finish_reason="length" if n == sampling.max_new_tokens else "stop",
                               weight_version=self._version, text=" ".join(map(str, ids))))
        tokens = sum(len(r.output_ids) for r in out)
        time.sleep(tokens * self.seconds_per_token)
        self.generated_tokens += tokens
        return out

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
              temperature: float = 1.0) -> list[list[float]]:
        return [[-1.0] * (len(s) - p) for s, p in zip(sequences, prompt_lens, strict=True)]

    def begin_weight_update(self) -> None: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _ in named_tensors:
            pass

    def end_weight_update(self, version: str) -> None:
        self._version = version

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None: ...

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None: ...

    def flush_cache(self) -> None: ...

    def health(self) -> bool:
        return True

    def shutdown(self) -> None: ...
