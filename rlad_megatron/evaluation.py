"""Evaluation metrics: Mean@k and the unbiased Pass@k estimator, overall and per subset.

    mean@n = mean over prompts of (correct samples / n)            (RLAD's "Mean@32": mean Pass@1 over 32 samples)
    pass@k = 1 - C(n - c, k) / C(n, k)      (n samples per prompt, c of them correct; Chen et al. 2021)

Metrics only: the samples come from `rollout.generate.generate_and_score` (training evals and `rlad-eval`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from math import comb

# generator knobs that name a difficulty subset, first found wins (K&K: people; zebra: people; sums: terms)
SUBSET_KEYS = ("n_people", "num_people", "max_terms")


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def _lookup(meta: dict, key: str):
    """`meta[key]`, else a dotted path through nested dicts (e.g. `rg_entry.metadata.difficulty.n_people`)."""
    if key in meta:
        return meta[key]
    value = meta
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def subset_of(sample, key: str | None = None) -> str:
    """Subset label of a sample.

    `key` given: `<task>/<key>=<value>` with the value looked up in `meta` (dotted paths allowed), in the
    generator config (`rg_config`) or in the reasoning-gym item's recorded difficulty; "<task>/<key>=?" if
    absent. Otherwise, first match of: a `subset` column of the prompt file; the addition task's number of
    terms; a difficulty knob (`SUBSET_KEYS`) in the meta, the generator config or the item's difficulty
    (e.g. K&K `n_people`); the task name; "all".
    """
    meta = sample.meta or {}
    task = sample.task or "all"
    cfg = meta.get("rg_config") or {}
    difficulty = ((meta.get("rg_entry") or {}).get("metadata") or {}).get("difficulty") or {}

    def find(k: str):
        for source in (meta, cfg, difficulty):
            v = _lookup(source, k) if isinstance(source, dict) else None
            if v is not None:
                return v
        return None

    if key:
        v = find(key)
        return f"{task}/{key}={'?' if v is None else v}"
    if meta.get("subset") is not None:
        return str(meta["subset"])
    if task == "addition" and isinstance(meta.get("terms"), list):
        return f"addition/terms={len(meta['terms'])}"
    for k in SUBSET_KEYS:
        v = find(k)
        if v is not None:
            return f"{task}/{k}={v}"
    return task


def _as_ks(k: int | Sequence[int]) -> list[int]:
    return [int(k)] if isinstance(k, int) else sorted({int(x) for x in k})


def summarize(correct: list[list[float]], subsets: list[str], k: int | Sequence[int]) -> dict:
    """`correct[i]` are the n scores of prompt i (a sample counts as correct when its score is >= 1).
    Returns `{"overall": m, <subset>: m, ...}` with `m = {"mean@n", "pass@k" for each k <= n, "prompts"}`;
    `k` is one int or several. Subsets are listed in sorted order."""
    if len(correct) != len(subsets):
        raise ValueError(f"{len(correct)} prompts but {len(subsets)} subset labels")
    if not correct:
        raise ValueError("summarize: no prompts")
    widths = {len(r) for r in correct}
    if len(widths) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(widths)}")
    n = widths.pop()
    ks = _as_ks(k)
    if any(not 1 <= x <= n for x in ks):
        raise ValueError(f"pass@k needs 1 <= k <= n = {n}, got k={ks}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subsets):
        groups[s].append(i)
    groups_all = {"overall": list(range(len(correct))), **{s: groups[s] for s in sorted(groups)}}
    out = {}
    for name, idx in groups_all.items():
        rows = [correct[i] for i in idx]
        hits = [int(sum(x >= 1.0 for x in r)) for r in rows]
        m = {f"mean@{n}": sum(sum(r) / n for r in rows) / len(rows)}
        for kk in ks:
            m[f"pass@{kk}"] = sum(pass_at_k(n, c, kk) for c in hits) / len(rows)
        m["prompts"] = float(len(rows))
        out[name] = m
    return out
