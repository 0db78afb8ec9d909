"""Rewards scored by reasoning-gym's own `score_answer` on the last `<answer>...</answer>` of a response.

The item comes from `sample.meta["rg_entry"]` (see `data.tasks`); for prompt files without it the
entry is rebuilt as `{"answer": sample.answer, "metadata": sample.meta.get("metadata", {})}`,
enough for tasks whose scorer reads only those (knights_knaves, chain_sum, countdown with
`numbers`/`target` metadata). The scorer is the dataset built with the sample's `rg_config`,
cached per process. Binary by default (1.0 only for a full score): reasoning-gym's partial
credits (substring credit, 0.01/0.05 floors) are exploitable and shift GRPO group means.

The answer is cut out in linear time (`last_tagged`), not with reasoning-gym's `extract_answer`, whose lazy
regex over the whole response is quadratic: a 100 KB response of repeated unclosed `<answer>` tags (RL policies
produce such loops at max length) took seconds per call. Differences: for a nested `<answer>a <answer>b</answer>`
the innermost (`b`) is taken, not `a <answer>b`; an answer longer than `MAX_ANSWER_CHARS` counts as absent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlad_megatron.data.prompts import PromptSample

Scorer = Callable[[str | None, dict[str, Any]], float]
OPEN_TAG, CLOSE_TAG = "<answer>", "</answer>"
MAX_ANSWER_CHARS = 1024  # longer "answers" are degenerate outputs; the bound also bounds the scorers' work
# (countdown's sympy parse of a 4,000-character sum takes ~0.13 s, of 1,000 characters ~0.03 s)
_SCORERS: dict[tuple[str, str], Scorer] = {}


def _scorer(name: str, cfg: dict[str, Any]) -> Scorer:
    key = (name, repr(sorted(cfg.items())))
    if key not in _SCORERS:
        import reasoning_gym

        if name not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"sample names reasoning-gym dataset {name!r}, which is not registered")
        _SCORERS[key] = reasoning_gym.create_dataset(name, seed=0, size=1, **cfg).score_answer
    return _SCORERS[key]


def sample_entry(sample: PromptSample) -> dict[str, Any]:
    """The reasoning-gym item of `sample` (stored or rebuilt from answer + metadata)."""
    entry = sample.meta.get("rg_entry")
    if entry is not None:
        return entry
    return {"question": sample.prompt, "answer": sample.answer, "metadata": sample.meta.get("metadata", {})}


def sample_dataset(sample: PromptSample, expected: str | None = None) -> str:
    """Dataset name of `sample`: meta `rg_dataset`, the entry's `source_dataset`, the task, or `expected`."""
    meta_name = sample_entry(sample).get("metadata", {}).get("source_dataset")
    name = sample.meta.get("rg_dataset") or meta_name or sample.task or expected
    if not name:
        raise ValueError("reasoning_gym reward: sample has no task, rg_dataset or source_dataset to route by")
    if expected is not None and name != expected:
        raise ValueError(f"reward '{expected}' got a sample of task {name!r}")
    return name


def last_tagged(text: str, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG,
                max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Stripped content of the last complete `open_tag ... close_tag` pair, or None (also when longer than
    `max_chars`). The pair is the last opening tag that is closed later, up to the first closing tag after it:
    two reverse scans and one forward scan (`str.rfind`/`find`), so linear in `len(text)`."""
    close = text.rfind(close_tag)
    if close < 0:
        return None
    start = text.rfind(open_tag, 0, close)
    if start < 0:
        return None
    begin = start + len(open_tag)
    end = text.find(close_tag, begin)
    if end - begin > max_chars:
        return None
    return text[begin:end].strip()


def extract_tagged_answer(response: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>` (see `last_tagged`), or None."""
    return last_tagged(response)


def rg_reward(response: str, sample: PromptSample, *, task: str | None = None, partial_credit: bool = False) -> float:
    """reasoning-gym score of the tagged answer; `task` pins the dataset, None routes by the sample."""
    name = sample_dataset(sample, task)
    score = _scorer(name, dict(sample.meta.get("rg_config") or {}))(
        extract_tagged_answer(response), sample_entry(sample)
    )
    return float(score) if partial_credit else float(score == 1.0)


def answer_tag_format(response: str, sample: PromptSample) -> bool:
    """Format check: a non-empty `<answer>...</answer>` is present."""
    return bool(extract_tagged_answer(response))
