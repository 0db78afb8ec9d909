"""Held-out by construction: every builtin item belongs to exactly one split by a hash of its content.

    bucket(item) = int(sha256(SALT + key(item))[:16], 16) mod BUCKETS      (key: the prompt text the model sees)
    split(item)  = "eval" if bucket == 0, "tune" if bucket == 1, else "train"

Training sets keep only `train` items, eval sets only `eval` items and tuning-eval sets only `tune` items, drawing
as many generator items as needed to reach the requested size. Whatever the seeds, sizes, generator configs or
stages, a prompt of an eval set can therefore never be a training prompt, nor a prompt of the other held-out split:
different generator seeds alone do not give different items when the item space is small (a 1-digit addition eval
set drawn from its own seed shares most of its items with any large training set). The price: training loses
2/BUCKETS of the item space, and an eval set of n items draws about n * BUCKETS generator items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from rlad_megatron.data.generators import EVAL_SEED_OFFSET, Split, dataset, split_seed, to_plain
from rlad_megatron.errors import UserError

SALT = "rlad_megatron/held-out/v1:"
BUCKETS = 16
HELD_OUT = {"eval": 0, "tune": 1}  # bucket of each held-out split; every other bucket is `train`
SPLITS = ("train", *HELD_OUT)
DRAW_FACTOR = 4  # give up after this many times the expected number of generator draws (+ a constant)


def bucket(key: str) -> int:
    """The item's bucket in [0, BUCKETS): a stable hash of its key (same on every machine and Python run)."""
    return int(hashlib.sha256((SALT + key).encode("utf-8")).hexdigest()[:16], 16) % BUCKETS


def split_of(key: str) -> Split:
    """`train`, `eval` or `tune`: the one split an item with this key may appear in."""
    b = bucket(key)
    return next((name for name, hb in HELD_OUT.items() if hb == b), "train")  # type: ignore[return-value]


def split_share(split: Split) -> float:
    """Expected fraction of generator items that fall in `split`."""
    if split == "train":
        return (BUCKETS - len(HELD_OUT)) / BUCKETS
    if split in HELD_OUT:
        return 1 / BUCKETS
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def draw_split(name: str, *, split: Split, size: int, seed: int, key: Callable[[dict[str, Any]], str | None],
               **cfg: Any) -> list[tuple[dict[str, Any], str]]:
    """The first `size` items of reasoning-gym dataset `name` (generator seed `split_seed(seed, split)`, items in
    index order) whose `key(entry)` falls in `split`, as `(entry, key)`; `key` returns None for items the task
    cannot use (they are skipped). A `UserError` when the draws run out: the item space is too small for a
    held-out set of that size."""
    if not 0 < size <= EVAL_SEED_OFFSET:
        raise UserError(f"size must be in [1, {EVAL_SEED_OFFSET}], got {size}")
    limit = min(int(size / split_share(split) * DRAW_FACTOR) + 1024, EVAL_SEED_OFFSET)
    ds = dataset(name, split=split, size=limit, seed=seed, **cfg)
    out: list[tuple[dict[str, Any], str]] = []
    for i in range(limit):  # reasoning-gym builds item i lazily from Random(seed + i)
        entry = to_plain(ds[i])
        k = key(entry)
        if k is None or split_of(k) != split:
            continue
        out.append((entry, k))
        if len(out) == size:
            return out
    raise UserError(f"builtin:{name} ({cfg or 'default config'}): only {len(out)} of {size} items of the {split!r} "
                    f"split in {limit} generator draws from seed {split_seed(seed, split)}; the item space is too "
                    "small for a held-out set of this size (ask for fewer items or a larger task config)")
