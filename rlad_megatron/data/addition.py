"""Column-addition task for the tiny CPU reproduction (research/data_rewards.md section 5).

Questions come from reasoning-gym `basic_arithmetic` restricted to 2-3 non-negative terms of 1-4
digits joined by `+`. Every term is zero-padded to `width` (= max_digits, 4) digits:

    prompt      Q0814+0707+0965:
    completion  4+7+5+0=16;1+0+6+1=8;8+7+9+0=24;0+0+0+2=2;A2486<eos>

The completion has one step per column, least significant first: that column's digit of every
term (in prompt order), then the carry into the column as the last addend (0 for the first
column), `=`, and the column sum. The next carry is `sum // 10`. After the last step comes `A`
and the total without leading zeros (the last column's sum followed by the other columns' last
digits, most significant first). The tokenizer's EOS token ends the completion; it is not part
of `addition_trace`. The reward is the exact number after the final `A` (`rewards.addition`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rlad_megatron.data.generators import Split
from rlad_megatron.data.partition import draw_split
from rlad_megatron.data.prompts import PromptSample

TASK = "addition"
WIDTH = 4
BASE_CONFIG: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 3,
    "min_digits": 1,
    "max_digits": WIDTH,
    "operators": ("+",),
    "allow_parentheses": False,
    "allow_negation": False,
}
_FIXED = ("operators", "allow_parentheses", "allow_negation")
# A whole completion: >= 1 steps "d+...+c=s;" then "A<digits>".
TRACE_RE = re.compile(r"(?:\d+(?:\+\d+)+=\d+;)+A\d+")


def _check_terms(terms: Sequence[int], width: int) -> None:
    if len(terms) < 1 or any(not isinstance(t, int) or t < 0 or t >= 10**width for t in terms):
        raise ValueError(f"terms must be non-empty ints in [0, 10**{width}), got {list(terms)}")


def addition_prompt(terms: Sequence[int], width: int = WIDTH) -> str:
    """`Q` + zero-padded terms joined by `+` + `:`, e.g. `Q0814+0707+0965:`."""
    _check_terms(terms, width)
    return "Q" + "+".join(f"{t:0{width}d}" for t in terms) + ":"


def addition_trace(terms: Sequence[int], width: int = WIDTH) -> str:
    """The column-addition completion (teacher/SFT target) for `terms`, without EOS."""
    _check_terms(terms, width)
    padded = [f"{t:0{width}d}" for t in terms]
    steps, carry = [], 0
    for col in range(width - 1, -1, -1):
        digits = [int(p[col]) for p in padded]
        total = sum(digits) + carry
        steps.append("+".join(str(d) for d in [*digits, carry]) + f"={total}")
        carry = total // 10
    return ";".join(steps) + f";A{sum(terms)}"


def parse_terms(expression: str) -> list[int]:
    """Terms of a `+`-only expression such as `50 + 83 + 6`."""
    if not re.fullmatch(r"\s*\d+(?:\s*\+\s*\d+)*\s*", expression):
        raise ValueError(f"not a sum of non-negative integers: {expression!r}")
    return [int(t) for t in re.findall(r"\d+", expression)]


def make_addition_dataset(split: Split, size: int, seed: int, **cfg: Any) -> list[PromptSample]:
    """Seeded addition prompts of `split` (`data.partition`: a prompt is in exactly one of train / eval / tune);
    `cfg` may change term/digit ranges (width follows max_digits).

    `meta` holds `terms`, `target` (the trace), and the reasoning-gym entry/config used by the
    `reasoning_gym` reward (`rg_dataset`, `rg_config`, `rg_entry`).
    """
    fixed = sorted(set(cfg) & set(_FIXED))
    if fixed:
        raise ValueError(f"addition task fixes {fixed}; only term/digit ranges can change")
    config = {**BASE_CONFIG, **cfg}
    width = config["max_digits"]

    def key(entry: dict) -> str | None:
        # reasoning-gym's digit ranges are inclusive of 10**max_digits (e.g. 10000 for 4 digits, ~0.1% of items):
        # such items don't fit the fixed-width format and are skipped (the draw continues to keep `size`)
        terms = parse_terms(entry["metadata"]["expression"])
        return None if max(terms) >= 10**width else addition_prompt(terms, width)

    samples = []
    for entry, prompt in draw_split("basic_arithmetic", split=split, size=size, seed=seed, key=key, **config):
        terms = parse_terms(entry["metadata"]["expression"])
        if str(sum(terms)) != entry["answer"]:
            raise RuntimeError(f"reasoning-gym answer {entry['answer']!r} != sum of {terms}")
        meta = {
            "terms": terms,
            "width": width,
            "target": addition_trace(terms, width),
            "rg_dataset": "basic_arithmetic",
            "rg_config": dict(config),
            "rg_entry": entry,
        }
        samples.append(PromptSample(prompt=prompt, answer=entry["answer"], task=TASK, meta=meta))
    return samples
