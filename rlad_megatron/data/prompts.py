"""Prompt sets: the `PromptSample` record, JSONL/Parquet loading with row-exact errors, encoding.

A row holds either a prompt string or a list of chat messages (`{"role", "content"}` dicts), a
ground-truth answer and an optional task name; every other column is kept in `meta`. The prompt
field may itself hold a message list (verl-style parquet). Keys may be dotted paths into nested
objects (e.g. `answer_key="reward_model.ground_truth"`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlad_megatron.errors import UserError

Messages = list[dict[str, str]]
_MISSING = object()


class PromptFileError(UserError):
    """A malformed prompt row; the message starts with `file:line` (JSONL) or `file:row i` (Parquet)."""


@dataclass
class PromptSample:
    """One RL prompt: text or chat messages, the reference answer, its task, and task metadata."""

    prompt: str | Messages
    answer: str
    task: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] | None = None  # filled by `encode_samples`

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def _lookup(row: dict, key: str) -> Any:
    """`row[key]`, else follow a dotted path through nested dicts; `_MISSING` when absent or None."""
    if key in row:
        value = row[key]
    else:
        value = row
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
    return _MISSING if value is None else value


def _check_messages(value: Any, where: str, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise PromptFileError(
            f"{where}: field '{key}' must be a non-empty list of chat messages, got {type(value).__name__}"
        )
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise PromptFileError(
                f"{where}: field '{key}'[{j}] must be a dict with string 'role' and 'content', got {msg!r}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def row_to_sample(
    row: Any,
    where: str,
    *,
    prompt_key: str = "prompt",
    messages_key: str = "messages",
    answer_key: str = "answer",
    task_key: str = "task",
    default_task: str = "",
) -> PromptSample:
    """Validate one decoded row; errors start with `where` (e.g. `prompts.jsonl:17`)."""
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt, messages = _lookup(row, prompt_key), _lookup(row, messages_key)
    if prompt is not _MISSING and messages is not _MISSING:
        raise PromptFileError(f"{where}: both '{prompt_key}' and '{messages_key}' are set; give exactly one")
    if prompt is _MISSING and messages is _MISSING:
        raise PromptFileError(f"{where}: field '{prompt_key}' (string) or '{messages_key}' (chat messages) missing")
    if messages is not _MISSING:
        text: str | Messages = _check_messages(messages, where, messages_key)
    elif isinstance(prompt, list):
        text = _check_messages(prompt, where, prompt_key)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise PromptFileError(
            f"{where}: field '{prompt_key}' must be a string or chat messages, got {type(prompt).__name__}"
        )

    answer = _lookup(row, answer_key)
    if answer is _MISSING:
        raise PromptFileError(f"{where}: field '{answer_key}' missing")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise PromptFileError(f"{where}: field '{answer_key}' must be a string or number, got {type(answer).__name__}")

    task = _lookup(row, task_key)
    if task is _MISSING:
        task = default_task
    elif not isinstance(task, str):
        raise PromptFileError(f"{where}: field '{task_key}' must be a string, got {type(task).__name__}")

    used = {prompt_key, messages_key, answer_key, task_key}
    meta = {k: v for k, v in row.items() if k not in used}
    return PromptSample(prompt=text, answer=str(answer), task=task, meta=meta)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    msg = e.msg.removesuffix(" at")  # "Invalid control character at" + " at column N"
                    raise PromptFileError(f"{where}: invalid JSON ({msg} at column {e.colno})") from None
                yield where, row
        except UnicodeDecodeError:
            raise PromptFileError(f"{path}:{lineno + 1}: not UTF-8 text (expected JSON lines)") from None


def _iter_parquet(path: Path, max_rows: int | None = None) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if max_rows is None:
            rows = pq.read_table(path).to_pylist()
        else:
            first = next(pq.ParquetFile(path).iter_batches(batch_size=max_rows), None)
            rows = first.to_pylist() if first is not None else []
    except (pa.ArrowException, OSError) as e:
        raise PromptFileError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(rows):
        yield f"{path}:row {i}", row


def load_prompt_file(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    messages_key: str = "messages",
    answer_key: str = "answer",
    task_key: str = "task",
    default_task: str = "",
    max_rows: int | None = None,
) -> list[PromptSample]:
    """Load `.jsonl`/`.json` lines or `.parquet` (only the first `max_rows` rows when given, e.g. to validate a
    file cheaply). Errors (`PromptFileError`, a `UserError`) name the file and 1-based line / 0-based row."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet", ".pq"):
        raise PromptFileError(f"{path}: unsupported prompt file type '{suffix}' (expected .jsonl or .parquet)")
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    if suffix in (".jsonl", ".json"):
        rows: Iterable[tuple[str, Any]] = itertools.islice(_iter_jsonl(path), max_rows)
    else:
        rows = _iter_parquet(path, max_rows)
    keys = {"prompt_key": prompt_key, "messages_key": messages_key, "answer_key": answer_key, "task_key": task_key}
    samples = [row_to_sample(row, where, default_task=default_task, **keys) for where, row in rows]
    if not samples:
        raise PromptFileError(f"{path}: no prompts in file (expected one JSON object per line, or Parquet rows)")
    return samples


def save_prompt_file(samples: Iterable[PromptSample], path: str | Path) -> None:
    """Write samples as JSONL (`prompt` or `messages`, `answer`, `task`, then meta columns)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for s in samples:
            row: dict[str, Any] = {"messages" if s.is_chat else "prompt": s.prompt, "answer": s.answer, "task": s.task}
            clash = set(row) & set(s.meta)
            if clash:
                raise ValueError(f"meta keys {sorted(clash)} clash with the record fields")
            row.update(s.meta)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def encode_prompt(sample: PromptSample, tokenizer: Any, apply_chat_template: bool = True) -> list[int]:
    """Token ids of the prompt: the chat template with a generation prompt when the tokenizer has one.

    A plain-string prompt is wrapped as one user message for the template. Without a template (or
    with `apply_chat_template=False`) the raw text is encoded with the tokenizer's special tokens
    (e.g. BOS); chat messages cannot be encoded that way and raise `ValueError`.
    """
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        messages = sample.prompt if sample.is_chat else [{"role": "user", "content": sample.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if sample.is_chat:
        why = "apply_chat_template=False" if apply_chat_template is False else "the tokenizer has no chat_template"
        raise ValueError(f"prompt is chat messages but {why}; give a template or plain-string prompts")
    return list(tokenizer(sample.prompt, add_special_tokens=True)["input_ids"])


def encode_samples(
    samples: Iterable[PromptSample], tokenizer: Any, apply_chat_template: bool = True
) -> list[PromptSample]:
    """Copies of `samples` with `prompt_ids` filled by `encode_prompt`."""
    return [replace(s, prompt_ids=encode_prompt(s, tokenizer, apply_chat_template)) for s in samples]
