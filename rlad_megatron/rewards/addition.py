"""Column-addition reward: the digits after the final `A` must equal the answer exactly.

Trailing whitespace and `<eos>`/`<pad>` strings (if the response was decoded with special tokens)
are ignored; anything else after the answer (e.g. a run-on without EOS) scores 0, and so do
leading zeros. The format check is the full trace grammar of `data.addition`.
"""

from __future__ import annotations

import re

from rlad_megatron.data.addition import TRACE_RE
from rlad_megatron.data.prompts import PromptSample

_TAIL_RE = re.compile(r"(?:<eos>|<pad>|\s)+$")
_FINAL_RE = re.compile(r"A(\d+)$")


def _clean(response: str) -> str:
    return _TAIL_RE.sub("", response)


def final_answer(response: str) -> str | None:
    """The digits after the final `A` when they end the response, else None."""
    m = _FINAL_RE.search(_clean(response))
    return m.group(1) if m else None


def addition_reward(response: str, sample: PromptSample) -> float:
    """1.0 when the final answer equals `sample.answer` exactly, else 0.0."""
    return float(final_answer(response) == sample.answer)


def trace_format(response: str, sample: PromptSample) -> bool:
    """Format check: the whole response is `step;step;...;A<digits>`."""
    return TRACE_RE.fullmatch(_clean(response)) is not None
