"""Procedural task sets from reasoning-gym, generated offline from a seed.

reasoning-gym builds item i of `create_dataset(name, seed=S)` from `random.Random(S + i)`, so two
sets whose seeds differ by less than their size overlap. The eval split therefore uses
`seed + EVAL_SEED_OFFSET` (10**9) and sizes are capped below that offset.

Each sample keeps what the reward needs in `meta` (all picklable, numpy scalars made plain):
`rg_dataset` (name), `rg_config` (the generator config overrides) and `rg_entry` (the
reasoning-gym item, passed to its `score_answer`).
"""

from __future__ import annotations

from typing import Any, Literal

from rlad_megatron.data.prompts import PromptSample
from rlad_megatron.errors import UserError

EVAL_SEED_OFFSET = 10**9
# Tasks the project documents and tests; any other registered reasoning-gym name also works.
BUILTIN_TASKS = ("knights_knaves", "countdown", "chain_sum", "basic_arithmetic", "addition")
ANSWER_INSTRUCTION = "default"  # key of reasoning_gym.utils.SYSTEM_PROMPTS: asks for <answer>...</answer>

Split = Literal["train", "eval"]


def split_seed(seed: int, split: Split) -> int:
    """Generator seed of a split: `seed` for train, `seed + 10**9` for eval."""
    if split == "train":
        return seed
    if split == "eval":
        return seed + EVAL_SEED_OFFSET
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def to_plain(obj: Any) -> Any:
    """Copy of `obj` with numpy scalars turned into Python scalars (containers kept)."""
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    item = getattr(obj, "item", None)
    if callable(item) and type(obj).__module__ == "numpy":
        return item()
    return obj


def default_system_prompt() -> str:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS[ANSWER_INSTRUCTION]


def check_task_name(name: str) -> None:
    """UserError unless `name` is `addition` or a registered reasoning-gym dataset."""
    import reasoning_gym

    if name != "addition" and name not in reasoning_gym.factory.DATASETS:
        raise UserError(f"unknown task {name!r}; built-ins: {', '.join(BUILTIN_TASKS)} or a reasoning-gym "
                        "dataset name")


def generate_entries(name: str, *, split: Split, size: int, seed: int, **cfg: Any) -> list[dict[str, Any]]:
    """`size` plain reasoning-gym items of dataset `name` for `split`."""
    import reasoning_gym

    if not 0 < size <= EVAL_SEED_OFFSET:
        raise UserError(f"size must be in [1, {EVAL_SEED_OFFSET}], got {size}")
    check_task_name(name)
    ds = reasoning_gym.create_dataset(name, seed=split_seed(seed, split), size=size, **cfg)
    return [to_plain(ds[i]) for i in range(size)]


def make_task_dataset(
    name: str,
    *,
    split: Split = "train",
    size: int,
    seed: int,
    system_prompt: str | None = "default",
    chat: bool = True,
    **cfg: Any,
) -> list[PromptSample]:
    """Seeded prompt set for a reasoning-gym task (or `addition`, see `data.addition`).

    The prompt asks for the final answer inside `<answer>...</answer>`: by default reasoning-gym's
    "default" system prompt. `chat=True` gives `[system, user]` messages (system dropped when
    `system_prompt=None`); `chat=False` gives one string `system_prompt + "\\n\\n" + question`.
    `cfg` overrides the generator's config (e.g. `n_people=3`). `addition` ignores the prompt options.
    """
    if name == "addition":
        from rlad_megatron.data.addition import make_addition_dataset

        return make_addition_dataset(split, size, seed, **cfg)
    if system_prompt == "default":
        system_prompt = default_system_prompt()
    plain_cfg = to_plain(cfg)
    samples = []
    for entry in generate_entries(name, split=split, size=size, seed=seed, **cfg):
        question = entry["question"]
        if chat:
            prompt: Any = [{"role": "user", "content": question}]
            if system_prompt:
                prompt.insert(0, {"role": "system", "content": system_prompt})
        else:
            prompt = f"{system_prompt}\n\n{question}" if system_prompt else question
        answer = "" if entry["answer"] is None else str(entry["answer"])  # None: verifier-only tasks
        meta = {"rg_dataset": name, "rg_config": dict(plain_cfg), "rg_entry": entry}
        samples.append(PromptSample(prompt=prompt, answer=answer, task=name, meta=meta))
    return samples
