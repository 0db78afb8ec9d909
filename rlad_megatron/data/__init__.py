"""Prompt sets (JSONL/Parquet), seeded reasoning-gym task sets, the column-addition task, the training prompt
stream, a char tokenizer."""

from rlad_megatron.data.addition import addition_prompt, addition_trace, make_addition_dataset
from rlad_megatron.data.char_tokenizer import build_char_tokenizer
from rlad_megatron.data.generators import BUILTIN_TASKS, EVAL_SEED_OFFSET, split_seed
from rlad_megatron.data.loader import load_prompts
from rlad_megatron.data.prompts import (
    PromptFileError,
    PromptSample,
    encode_prompt,
    encode_samples,
    load_prompt_file,
    save_prompt_file,
)
from rlad_megatron.data.stream import PromptStream
from rlad_megatron.data.tasks import make_task_dataset

__all__ = [
    "BUILTIN_TASKS",
    "EVAL_SEED_OFFSET",
    "PromptFileError",
    "PromptSample",
    "PromptStream",
    "addition_prompt",
    "addition_trace",
    "build_char_tokenizer",
    "encode_prompt",
    "encode_samples",
    "load_prompt_file",
    "load_prompts",
    "make_addition_dataset",
    "make_task_dataset",
    "save_prompt_file",
    "split_seed",
]
