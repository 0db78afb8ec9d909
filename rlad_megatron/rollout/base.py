"""The rollout-engine contract, shaped like SGLang's RL API.

Every backend (in-process `transformers` on CPU, SGLang colocated or remote on GPU) implements
`RolloutEngine`. Conventions shared by all backends:

* Log-probs are `log_softmax(raw_logits / temperature)` of the sampled token, taken before top-k/top-p
  filtering (SGLang's convention), so they are comparable with the trainer's. Greedy requests
  (`temperature < GREEDY_EPS`) report the raw `log_softmax(logits)`, as SGLang does.
* A stop token (EOS unless `ignore_eos`, or any of `stop_token_ids`) ends the sequence with
  `finish_reason == "stop"` and IS included in `output_ids` with its log-prob. This is the token stream of
  SGLang's `meta_info.output_token_logprobs`, which RL trainers consume (the EOS must be trained on);
  SGLang's detokenizer may trim it from `output_ids`/`text`, so the SGLang backend builds `output_ids` from the
  log-prob triples. `meta["matched"]` holds the matched token id (or stop string).
* Weights arrive only through `update_weights` inside a `begin_weight_update` / `end_weight_update` session,
  with Hugging Face parameter names. `end_weight_update(version)` sets the label echoed in
  `Rollout.weight_version`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

GREEDY_EPS = 1e-6  # SGLang's _SAMPLING_EPS: a temperature below it means greedy decoding
MEMORY_TAGS = frozenset({"weights", "kv_cache", "cuda_graph"})


class WeightUpdateError(RuntimeError):
    """A weight update failed (wrong session state, unknown name, shape mismatch, engine error)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling settings (one set for the whole batch).

    `seed`: row `i` of a batch samples from its own generator seeded with `seed + i`, so a row's sample does not
    depend on the rest of the batch; `None` draws a base seed from the engine's own generator.
    `stop`: stop strings; need an engine with a tokenizer.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class Rollout:
    prompt_ids: list[int]
    output_ids: list[int]  # sampled tokens, stop token included
    output_logprobs: list[float]  # [len(output_ids)], log_softmax(logits / T) at the sampled token
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str = ""
    text: str = ""  # decoded output (stop string trimmed), "" without a tokenizer
    meta: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, matched


def check_score_args(sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], temperature: float) -> None:
    """The arguments of `RolloutEngine.score`, checked the same way by every backend."""
    if len(sequences) != len(prompt_lens):
        raise ValueError("score: sequences and prompt_lens differ in length")
    for s, p in zip(sequences, prompt_lens, strict=True):
        if not 1 <= p <= len(s):
            raise ValueError(f"score: prompt_len {p} outside [1, {len(s)}]")
    if temperature < 0:
        raise ValueError(f"score: temperature must be >= 0, got {temperature}")


@runtime_checkable
class RolloutEngine(Protocol):
    @property
    def weight_version(self) -> str:
        """Label of the weights now loaded (SGLang's `weight_version`; "default" before any update)."""
        ...

    @property
    def update_dtype(self) -> torch.dtype | None:
        """dtype `update_weights` wants floating tensors in; `push_weights` casts to it before bucketing (fp32 ->
        bf16 halves the bytes sent). None: any floating dtype, the engine casts while loading (in-process engines).
        """
        ...

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]: ...

    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], temperature: float = 1.0
    ) -> list[list[float]]:
        """Prefill log-probs of sequences[i][prompt_lens[i]:] (one forward, no sampling); T < GREEDY_EPS means 1."""
        ...

    def begin_weight_update(self) -> None: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named tensors. Raises WeightUpdateError outside a session."""
        ...

    def end_weight_update(self, version: str) -> None:
        """Close the session and set the weight version. Raises WeightUpdateError if it was incomplete."""
        ...

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None: ...

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None: ...

    def flush_cache(self) -> None: ...

    def health(self) -> bool: ...

    def shutdown(self) -> None: ...
