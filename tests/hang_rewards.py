"""Rewards for the deadline tests: each returns `float(sample.answer)` after misbehaving as `sample.meta` says.

`meta["sleep"]` seconds of `time.sleep`, `meta["busy"]` seconds of a Python busy loop, or `meta["regex"]`: a
catastrophic C regex match that holds the GIL (only a worker process kill stops it)."""

from __future__ import annotations

import re
import time


def misbehave(response: str, sample) -> float:
    meta = sample.meta
    if meta.get("sleep"):
        time.sleep(meta["sleep"])
    if meta.get("busy"):
        end = time.monotonic() + meta["busy"]
        while time.monotonic() < end:
            pass
    if meta.get("regex"):
        re.match(r"(a+)+$", "a" * meta["regex"] + "b")  # 2^n backtracking steps in C
    return float(sample.answer)
