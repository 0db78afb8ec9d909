"""Math reward: math-verify equivalence of the response's last `\\boxed{...}` with the gold answer.

Boxed-only: a response without a complete `\\boxed{}` (or `\\fbox{}`) scores 0, even if the right
number appears unboxed. math-verify's `LatexExtractionConfig(boxed_match_priority=0,
try_extract_without_anchor=False)` alone is not boxed-only in 0.9.0 (it still accepts anchored
forms such as "final answer is $0.5$"), so the last box is cut out here (balanced braces, at most
`MAX_BOXED_CHARS`) and only that is parsed. Gold answers without `$` or `\\boxed` are wrapped as `$...$`.

math-verify's timeouts use `signal.alarm`, which only works on a process's main thread: on the
main thread (e.g. in a reward worker process, see `rewards.pool`) a `TIMEOUT_S` limit applies to parsing and
to verifying, elsewhere (threads) it is disabled (`parsing_timeout=None`, `timeout_seconds=None`); either way
the per-sample deadline of `rewards.scorer` (`--reward-timeout`) bounds the whole call.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from rlad_megatron.data.prompts import PromptSample

TIMEOUT_S = 5
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
MAX_BOXED_CHARS = 1000  # longer boxed "answers" are degenerate; bounding them bounds math-verify's parse too


def last_boxed(text: str, max_chars: int = MAX_BOXED_CHARS) -> str | None:
    """Content of the last `\\boxed{...}`/`\\fbox{...}` with balanced braces, else None (also when the content
    is longer than `max_chars`). Linear in `len(text)`: one regex scan for the box starts, then a brace scan of
    at most `max_chars` characters after the last one."""
    last = None
    for last in _BOX_RE.finditer(text):  # only the last match is wanted
        pass
    if last is None:
        return None
    begin = last.end()
    depth = 1
    for brace in _BRACE_RE.finditer(text, begin, min(len(text), begin + max_chars + 1)):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            content = text[begin:brace.start()].strip()
            return content or None
    return None


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=8192)
def _parse_gold(answer: str, timeout: int | None) -> Any:
    from math_verify import parse

    text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    gold = parse(text, parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math reward: cannot parse gold answer {answer!r}")
    return gold


def math_reward(response: str, sample: PromptSample) -> float:
    """1.0 when the last boxed expression is equivalent to `sample.answer`, else 0.0."""
    from math_verify import LatexExtractionConfig, parse, verify

    boxed = last_boxed(response)
    if boxed is None:
        return 0.0
    timeout = _timeout()
    config = [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    pred = parse(f"\\boxed{{{boxed}}}", extraction_config=config, parsing_timeout=timeout)
    if not pred:
        return 0.0
    return float(bool(verify(_parse_gold(sample.answer, timeout), pred, timeout_seconds=timeout)))


def boxed_format(response: str, sample: PromptSample) -> bool:
    """Format check: the response has a complete, non-empty `\\boxed{...}`."""
    return last_boxed(response) is not None
