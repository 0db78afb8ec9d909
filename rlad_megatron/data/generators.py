"""Seeded reasoning-gym items, the generation primitive of every builtin task set.

reasoning-gym builds item i of `create_dataset(name, seed=S)` from `random.Random(S + i)`, so two
sets whose seeds differ by less than their size draw the same items. The held-out splits therefore draw from
`seed + EVAL_SEED_OFFSET` (10**9, `eval`) and `seed + 2 * EVAL_SEED_OFFSET` (`tune`), sizes are capped below that
offset, and `data.partition` keeps each split to its own hash bucket of the item space (disjoint by construction,
even when the item space is small).
"""

from __future__ import annotations

from typing import Any, Literal

from rlad_megatron.errors import UserError

EVAL_SEED_OFFSET = 10**9
# Tasks the project documents and tests; any other registered reasoning-gym name also works.
BUILTIN_TASKS = ("knights_knaves", "countdown", "chain_sum", "basic_arithmetic", "addition")

Split = Literal["train", "eval", "tune"]
_SEED_SLOT = {"train": 0, "eval": 1, "tune": 2}


def split_seed(seed: int, split: Split) -> int:
    """Generator seed of a split: `seed` for train, `seed + 10**9` for eval, `seed + 2 * 10**9` for tune (the
    held-out set a tuning grid selects on, disjoint from the final eval set)."""
    if split not in _SEED_SLOT:
        raise ValueError(f"split must be one of {tuple(_SEED_SLOT)}, got {split!r}")
    return seed + _SEED_SLOT[split] * EVAL_SEED_OFFSET


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


def dataset(name: str, *, split: Split, size: int, seed: int, **cfg: Any):
    """The lazy reasoning-gym dataset `name` of `size` items for `split` (item i is built on access)."""
    import reasoning_gym

    if not 0 < size <= EVAL_SEED_OFFSET:
        raise UserError(f"size must be in [1, {EVAL_SEED_OFFSET}], got {size}")
    check_task_name(name)
    return reasoning_gym.create_dataset(name, seed=split_seed(seed, split), size=size, **cfg)


def generate_entries(name: str, *, split: Split, size: int, seed: int, **cfg: Any) -> list[dict[str, Any]]:
    """`size` plain reasoning-gym items of dataset `name` from the split's generator seed, in index order and NOT
    filtered by the held-out partition (`data.partition.draw_split` is what the task sets use)."""
    ds = dataset(name, split=split, size=size, seed=seed, **cfg)
    return [to_plain(ds[i]) for i in range(size)]
