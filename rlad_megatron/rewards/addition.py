"""Column-addition reward: the digits after the final `A` must equal the answer exactly.

Trailing whitespace and `<eos>`/`<pad>` strings (if the response was decoded with special tokens)
are ignored; anything else after the answer (e.g. a run-on without EOS) scores 0, and so do
leading zeros. The format check is the full trace grammar of `data.addition`.
"""

from __future__ import annotations

import re

from rlad_megatron.data.addition import TRACE_RE
from rlad_megatron.data.prompts import PromptSample

# the tail is matched on the reversed text: `(...)+$` on the text itself is quadratic on long whitespace runs
_REVERSED_TAIL_RE = re.compile(r"(?:>soe<|>dap<|\s)+")
_FINAL_RE = re.compile(r"A(\d+)$")
MAX_TRACE_CHARS = 1024  # a 3-term 4-digit trace is ~60 characters


def _clean(response: str) -> str:
    """`response` without trailing whitespace and `<eos>`/`<pad>` strings (linear time)."""
    m = _REVERSED_TAIL_RE.match(response[::-1])
    return response[: len(response) - m.end()] if m else response


def final_answer(response: str) -> str | None:
    """The digits after the final `A` when they end the response, else None."""
    m = _FINAL_RE.search(_clean(response))
    return m.group(1) if m else None


def addition_reward(response: str, sample: PromptSample) -> float:
    """1.0 when the final answer equals `sample.answer` exactly, else 0.0."""
    return float(final_answer(response) == sample.answer)


def trace_format(response: str, sample: PromptSample) -> bool:
    """Format check: the whole response is `step;step;...;A<digits>` (at most `MAX_TRACE_CHARS` characters: the
    regex backtracks over every `+term` of a long degenerate response)."""
    text = _clean(response)
    return len(text) <= MAX_TRACE_CHARS and TRACE_RE.fullmatch(text) is not None
