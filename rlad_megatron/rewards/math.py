"""Math reward: math-verify equivalence of the response's last `\\boxed{...}` with the gold answer.

Boxed-only: a response without a complete `\\boxed{}` (or `\\fbox{}`) scores 0, even if the right
number appears unboxed. math-verify's `LatexExtractionConfig(boxed_match_priority=0,
try_extract_without_anchor=False)` alone is not boxed-only in 0.9.0 (it still accepts anchored
forms such as "final answer is $0.5$"), so the last box is cut out here (balanced braces) and
only that is parsed. Gold answers without `$` or `\\boxed` are wrapped as `$...$`.

math-verify's timeouts use `signal.alarm`, which only works on a process's main thread: on the
main thread (e.g. in a `ProcessPoolExecutor` worker, see `rewards.pool`) a 5 s timeout applies,
elsewhere (threads) it is disabled (`parsing_timeout=None`, `timeout_seconds=None`).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from rlad_megatron.data.prompts import PromptSample

TIMEOUT_S = 5
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`/`\\fbox{...}` with balanced braces, else None."""
    starts = list(_BOX_RE.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                content = text[begin:i].strip()
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
