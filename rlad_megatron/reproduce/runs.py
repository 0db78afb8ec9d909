"""Where a reproduction run lives and what its own files say: metrics rows, eval curve, completeness, scores."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from rlad_megatron.reproduce.recipe import Setting


def run_path(out: Path, kind: str, s: Setting, seed: int) -> Path:
    """`<out>/<tune|final>/<setting>_seed<seed>`."""
    return out / kind / f"{s.name}_seed{seed}"


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out greedy accuracy) in step order; a step logged twice keeps its last value."""
    return sorted({row["step"]: row["eval/mean@1"] for row in rows if "eval/mean@1" in row}.items())


def run_done(d: Path, iters: int) -> bool:
    """A finished run: metrics up to the last step with its eval, and the exported student."""
    m = d / "metrics.jsonl"
    if not m.exists() or not (d / "student_hf" / "config.json").exists():
        return False
    return any(row["step"] == iters and "eval/mean@1" in row for row in read_metrics(m))


def tune_score(rows: list[dict]) -> float:
    """The selection score: mean tuning-eval accuracy over the run's last two evals."""
    curve = eval_curve(rows)
    return statistics.fmean(v for _, v in curve[-2:])


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean of a per-step metric over the training steps that logged a finite value."""
    vals = [row[key] for row in rows if key in row and row["step"] > 0 and math.isfinite(row[key])]
    return statistics.fmean(vals) if vals else None


def sum_of(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows if key in row and row["step"] > 0 and math.isfinite(row[key]))
