"""Prompt sets (JSONL/Parquet), seeded reasoning-gym task sets, the column-addition task, a char tokenizer."""

from rlad_megatron.data.addition import addition_prompt, addition_trace, make_addition_dataset
from rlad_megatron.data.char_tokenizer import build_char_tokenizer
from rlad_megatron.data.prompts import (
    PromptFileError,
    PromptSample,
    encode_prompt,
    encode_samples,
    load_prompt_file,
    save_prompt_file,
)
from rlad_megatron.data.tasks import BUILTIN_TASKS, EVAL_SEED_OFFSET, make_task_dataset, split_seed

__all__ = [
    "BUILTIN_TASKS",
    "EVAL_SEED_OFFSET",
    "PromptFileError",
    "PromptSample",
    "addition_prompt",
    "addition_trace",
    "build_char_tokenizer",
    "encode_prompt",
    "encode_samples",
    "load_prompt_file",
    "make_addition_dataset",
    "make_task_dataset",
    "save_prompt_file",
    "split_seed",
]
