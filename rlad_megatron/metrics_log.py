"""Training metrics: JSONL (always), TensorBoard, wandb (optional), progress, and a PNG of the curves.

`MetricsLogger.log(step, metrics)` appends `{"step", "time", **metrics}` to `out_dir/metrics.jsonl`.
Progress goes to stderr: a tqdm bar on a terminal; otherwise (a cluster job's log file) one plain line every
`progress_every_steps` steps (default: 20 lines per run) or `progress_every_s` seconds, whichever comes first,
Megatron style: `step 40/200 (20%) | elapsed 0:01:10 | 1.75 s/step | eta 0:04:40 | reward=0.53 loss=0.012`.
`close()` renders `out_dir/training_curves.png` with `plot_metrics`: one panel per metric family
(rewards, `eval/*`, losses, clip + gate fractions), each line a key, x = step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Self

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
# progress-bar label -> metric keys to show, first present wins
PROGRESS_KEYS: dict[str, tuple[str, ...]] = {
    "reward": ("rollout/reward_mean", "reward/mean", "reward"),
    "loss": ("actor/loss", "loss", "loss/total", "loss/policy"),
    "tok/s": ("perf/tokens_per_s", "tokens_per_s"),
    "eval": ("eval/accuracy", "eval/acc"),
}
# panel title -> key prefixes plotted in it
PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("rollout/reward_mean", "rollout/accuracy", "reward/"),
    "eval accuracy": ("eval/",),
    "loss": ("actor/loss", "actor/pg_loss", "loss"),
    "clip / gate fractions": ("actor/clip_frac", "actor/gate_", "clip/", "gate/"),
}
MAX_LINES_PER_PANEL = 8
_WANDB_WARNED = False


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _scalar(value) -> float | None:
    """A float for numbers, 0-d tensors/arrays and bools; None for anything else (skipped)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:  # torch tensor
        return float(value.item())
    if hasattr(value, "size") and getattr(value, "size", 0) == 1 and hasattr(value, "item"):  # numpy
        return float(value.item())
    return None


def progress_postfix(metrics: Mapping[str, float]) -> dict[str, str]:
    """The short `label=value` pairs the progress bar shows (only those whose keys exist)."""
    out = {}
    for label, keys in PROGRESS_KEYS.items():
        for key in keys:
            if key in metrics and metrics[key] is not None:
                v = float(metrics[key])
                out[label] = f"{v:.0f}" if label == "tok/s" else f"{v:.4g}"
                break
    return out


class MetricsLogger:
    """Logs scalar metrics per step. With `rank0_only` (default) every other rank is a no-op."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard_dir: str | Path | None = None,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        wandb_config: dict | None = None,
        total_steps: int,
        start_step: int = 0,
        rank0_only: bool = True,
        progress: bool = True,
        progress_stream=None,
        progress_every_steps: int | None = None,
        progress_every_s: float = 60.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.active = not rank0_only or _rank() == 0
        self._tb = self._wandb = self._bar = self._jsonl = self._lines = None
        if not self.active:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / METRICS_FILE
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb_project:
            self._wandb = _init_wandb(wandb_project, wandb_run_name, wandb_config, self.out_dir)
        stream = progress_stream or sys.stderr
        if progress and _isatty(stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=stream)
        elif progress:
            every = progress_every_steps or max(1, math.ceil(total_steps / 20))
            self._lines = ProgressLines(stream, total_steps, start_step, every_steps=every, every_s=progress_every_s)

    def log(self, step: int, metrics: Mapping[str, object]) -> None:
        """Record `metrics` (numbers or 1-element tensors; other values are skipped) at `step`."""
        if not self.active:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        record = {"step": int(step), "time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            postfix = progress_postfix(scalars)
            if postfix:
                self._bar.set_postfix(postfix, refresh=True)
        if self._lines is not None:
            self._lines.log(int(step), scalars)

    def close(self) -> Path | None:
        """Flush and close every sink, then render the curves PNG (returned; None if nothing to plot)."""
        if not self.active:
            return None
        png = None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()
            png = plot_metrics(self.jsonl_path, self.out_dir / CURVES_FILE)
        self._bar = self._tb = self._wandb = None
        return png

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLines:
    """Plain progress lines for non-terminal output: at most one per `every_steps` steps or `every_s` seconds
    (the first logged step and the last step always print)."""

    def __init__(self, stream, total_steps: int, start_step: int = 0, *, every_steps: int, every_s: float) -> None:
        self.stream, self.total, self.start_step = stream, total_steps, start_step
        self.every_steps, self.every_s = max(1, every_steps), every_s
        self._t0 = self._last_t = time.monotonic()
        self._last_step: int | None = None

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        now = time.monotonic()
        due = (self._last_step is None or step >= self.total or step - self._last_step >= self.every_steps
               or now - self._last_t >= self.every_s)
        if not due or step == self._last_step:
            return
        self._last_step, self._last_t = step, now
        done, elapsed = step - self.start_step, now - self._t0
        parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)", f"elapsed {_hms(elapsed)}"]
        if done > 0:
            per = elapsed / done
            parts += [f"{per:.3g} s/step", f"eta {_hms(per * max(self.total - step, 0))}"]
        postfix = progress_postfix(scalars)
        if postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in postfix.items()))
        print(" | ".join(parts), file=self.stream, flush=True)


def _init_wandb(project: str, name: str | None, config: dict | None, out_dir: Path):
    global _WANDB_WARNED
    try:
        import wandb
    except ImportError:
        if not _WANDB_WARNED:
            warnings.warn(f"wandb_project={project!r} given but wandb is not installed (pip install wandb): "
                          "logging to JSONL/TensorBoard only", stacklevel=3)
            _WANDB_WARNED = True
        return None
    return wandb.init(project=project, name=name, config=config, dir=str(out_dir))


def read_metrics(jsonl_path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] sorted by step; a step logged twice (resume, final eval) keeps the last value.
    A truncated last line (crash mid-write) is skipped."""
    by_step: dict[int, dict[str, float]] = {}
    for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        by_step.setdefault(int(rec["step"]), {}).update(
            {k: v for k, v in rec.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        )
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for k, v in by_step[step].items():
            series.setdefault(k, []).append((step, float(v)))
    return series


def _panel_keys(series: Mapping[str, list]) -> dict[str, list[str]]:
    """Panel title -> keys that start with one of its prefixes (or equal a prefix without its `/`)."""
    panels: dict[str, list[str]] = {}
    for title, prefixes in PANELS.items():
        keys = sorted(k for k in series if any(k.startswith(p) or k == p.rstrip("/") for p in prefixes))
        if keys:
            panels[title] = keys[:MAX_LINES_PER_PANEL]
    return panels


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> Path | None:
    """Render the curves of `jsonl_path` to `png_path` (Agg, no pyplot state). None if nothing matches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_metrics(jsonl_path)
    panels = _panel_keys(series)
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.6 * rows), dpi=110)
    FigureCanvasAgg(fig)
    for i, (title, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for k in keys:
            steps, values = zip(*series[k])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path
