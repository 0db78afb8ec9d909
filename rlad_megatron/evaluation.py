"""Evaluation metrics: Mean@k and the unbiased Pass@k estimator, overall and per subset.

    pass@k = 1 - C(n - c, k) / C(n, k)      (n samples per prompt, c of them correct; Chen et al. 2021)
"""

from __future__ import annotations

from collections import defaultdict
from math import comb

from rlad_megatron.rewards import score_batch
from rlad_megatron.rollout.base import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def subset_of(sample) -> str:
    """Subset label: the task name plus a difficulty knob when the generator records one."""
    meta = sample.meta or {}
    cfg = meta.get("rg_config") or {}
    for key in ("n_people", "num_people", "max_terms"):
        if key in cfg or key in meta:
            return f"{sample.task}/{key}={meta.get(key, cfg.get(key))}"
    return sample.task or "all"


def summarize(correct: list[list[float]], subsets: list[str], k: int) -> dict:
    """`correct[i]` are the n binary scores of prompt i. Returns overall and per-subset metrics."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subsets):
        groups[s].append(i)
    groups_all = {"overall": list(range(len(correct))), **groups}
    out = {}
    for name, idx in groups_all.items():
        rows = [correct[i] for i in idx]
        n = len(rows[0])
        out[name] = {
            f"mean@{n}": sum(sum(r) / n for r in rows) / len(rows),
            f"pass@{k}": sum(pass_at_k(n, int(sum(x >= 1.0 for x in r)), k) for r in rows) / len(rows),
            "prompts": float(len(rows)),
        }
    return out


def evaluate(engine, samples, *, reward: str, k: int, sampling: SamplingParams, tokenizer,
             reward_workers: int = 0, n: int | None = None) -> dict:
    """Generate n (default k) samples per prompt with `engine` and score them with the training reward."""
    n = n or k
    prompts = [s.prompt_ids for s in samples for _ in range(n)]
    rollouts = engine.generate(prompts, sampling)
    texts = [r.text or tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in rollouts]
    scores = score_batch(reward, texts, [s for s in samples for _ in range(n)], num_workers=reward_workers)
    correct = [scores[i * n:(i + 1) * n] for i in range(len(samples))]
    return summarize(correct, [subset_of(s) for s in samples], k)
