"""One prompt loader for training and evaluation: `builtin:<task>` generators or JSONL/Parquet files -> encoded
`PromptSample`s."""

from __future__ import annotations

from collections.abc import Sequence

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

    `builtin:<task>`: `size` items of the task's `split` (the eval split draws from `seed + 10**9`, disjoint from
    training seeds) per generator config in `configs` (e.g. `[{"n_people": 3}, {"n_people": 4}]`); without a
    chat template the system prompt and the question become one plain string. A file: its rows (the first `limit`
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
