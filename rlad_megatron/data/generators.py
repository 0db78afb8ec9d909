"""Seeded reasoning-gym items, the generation primitive of every builtin task set.

reasoning-gym builds item i of `create_dataset(name, seed=S)` from `random.Random(S + i)`, so two
sets whose seeds differ by less than their size overlap. The eval split therefore uses
`seed + EVAL_SEED_OFFSET` (10**9) and sizes are capped below that offset.
"""

from __future__ import annotations

from typing import Any, Literal

from rlad_megatron.errors import UserError

EVAL_SEED_OFFSET = 10**9
# Tasks the project documents and tests; any other registered reasoning-gym name also works.
BUILTIN_TASKS = ("knights_knaves", "countdown", "chain_sum", "basic_arithmetic", "addition")

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
