"""One prompt loader for training and evaluation: `builtin:<task>` generators or JSONL/Parquet files -> encoded
`PromptSample`s; `--task-config` parsing; the measured overlap of two prompt sets."""

from __future__ import annotations

import ast
import itertools
import json
from collections.abc import Iterable, Sequence

from rlad_megatron.data.generators import Split
from rlad_megatron.data.prompts import PromptSample, encode_samples, load_prompt_file
from rlad_megatron.data.tasks import make_task_dataset
from rlad_megatron.errors import UserError

BUILTIN_PREFIX = "builtin:"


def is_builtin(source: str) -> bool:
    return source.startswith(BUILTIN_PREFIX)


def load_prompts(source: str, *, split: Split, size: int, seed: int, tokenizer, apply_chat_template: bool,
                 configs: Sequence[dict] = ({},), limit: int | None = None) -> list[PromptSample]:
    """Encoded samples of one `--prompt-data` / `--eval-data` / `rlad-eval --data` source.

    `builtin:<task>`: `size` items of the task's `split` (`train`, `eval` or `tune`; `data.partition` keeps every
    prompt in one split, so held-out sets never share a prompt with training sets) per generator config in
    `configs` (e.g. `[{"n_people": 3}, {"n_people": 4}]`); without a chat template the system prompt and the
    question become one plain string. A file: its rows (the first `limit`
    when given; `configs` must be `[{}]`)."""
    configs = list(configs)
    if is_builtin(source):
        task = source[len(BUILTIN_PREFIX):]
        samples = [s for cfg in configs
                   for s in make_task_dataset(task, split=split, size=size, seed=seed, chat=apply_chat_template, **cfg)]
    else:
        if configs != [{}]:
            raise UserError(f"--task-config applies to builtin:<task> sets, not to the file {source}")
        samples = load_prompt_file(source)
        if limit:
            samples = samples[:limit]
    return encode_samples(samples, tokenizer, apply_chat_template)


def parse_task_config(items: Sequence[str], flag: str = "--task-config") -> list[dict]:
    """`["n_people=2,3", "depth_constraint=2"]` -> the cartesian product of the values, as config dicts."""
    keys, values = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE[,VALUE...]")
        parsed = []
        for v in raw.split(","):
            try:
                parsed.append(ast.literal_eval(v))
            except (ValueError, SyntaxError):
                parsed.append(v)
        keys.append(key.replace("-", "_"))
        values.append(parsed)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)] if keys else [{}]


def prompt_key(sample: PromptSample) -> str:
    """The prompt as the model is asked it (text, or the chat messages as JSON): what two sets can share."""
    return sample.prompt if isinstance(sample.prompt, str) else json.dumps(sample.prompt, sort_keys=True)


def overlap(held_out: Iterable[PromptSample], training: Iterable[PromptSample]) -> int:
    """How many prompts of `held_out` (counted with repeats) are also prompts of `training`."""
    train = {prompt_key(s) for s in training}
    return sum(prompt_key(s) in train for s in held_out)
