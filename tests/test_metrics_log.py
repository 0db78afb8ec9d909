"""MetricsLogger: JSONL lines, TensorBoard scalars, the curves PNG, rank-0-only, missing wandb."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from rlad_megatron import metrics_log
from rlad_megatron.metrics_log import MetricsLogger, plot_metrics, progress_postfix, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int) -> dict:
    m = {
        "reward/mean": 0.1 + 0.02 * step,
        "reward/std": 0.3,
        "loss": torch.tensor(2.0 / step),  # tensors are logged as floats
        "loss/kl": 0.01 * step,
        "clip/ratio_frac": 0.05,
        "gate/teacher_frac": 0.5 - 0.01 * step,
        "perf/tokens_per_s": 1234.5,
        "note": "not a number",  # skipped
    }
    if step % 5 == 0:
        m["eval/accuracy"] = step / 20
    return m


def test_jsonl_tensorboard_png(tmp_path: Path) -> None:
    out, tb = tmp_path / "run", tmp_path / "tb"
    with MetricsLogger(out, tensorboard_dir=tb, total_steps=20, progress=True) as log:
        for step in range(1, 21):
            log.log(step, _metrics(step))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert recs[3]["loss"] == pytest.approx(0.5) and recs[3]["reward/mean"] == pytest.approx(0.18)
    assert "note" not in recs[0] and "eval/accuracy" not in recs[0] and recs[4]["eval/accuracy"] == 0.25

    png = out / "training_curves.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000, len(data)

    events = list(tb.glob("events.out.tfevents.*"))
    assert events, list(tb.iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert {"reward/mean", "loss", "eval/accuracy", "gate/teacher_frac"} <= set(acc.Tags()["scalars"])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 21)) and loss[1].value == pytest.approx(1.0)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [5, 10, 15, 20]


def test_plot_metrics_standalone(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    recs = [{"step": s, "time": 0.0, "reward/mean": s * 0.1, "loss": 1.0 / s} for s in range(1, 6)]
    recs.append({"step": 3, "reward/mean": 9.0})  # re-logged after a resume: the last value wins
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "loss"')  # torn last line
    series = read_metrics(path)
    assert series["reward/mean"][2] == (3, 9.0) and len(series["loss"]) == 5
    png = plot_metrics(path, tmp_path / "plots" / "curves.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    only_perf = tmp_path / "perf.jsonl"
    only_perf.write_text(json.dumps({"step": 1, "perf/step_s": 1.0}) + "\n")
    assert plot_metrics(only_perf, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_progress_postfix_uses_present_keys() -> None:
    assert progress_postfix({"reward/mean": 0.5, "loss": 1.25, "perf/tokens_per_s": 1000.4}) == {
        "reward": "0.5", "loss": "1.25", "tok/s": "1000"}
    assert progress_postfix({"loss/total": 2.0, "eval/accuracy": 0.75}) == {"loss": "2", "eval": "0.75"}
    assert progress_postfix({"other": 1.0}) == {}


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    log = MetricsLogger(tmp_path / "r1", tensorboard_dir=tmp_path / "tb1", total_steps=3)
    log.log(1, {"loss": 1.0})
    assert log.close() is None
    assert not (tmp_path / "r1").exists() and not (tmp_path / "tb1").exists()
    every = MetricsLogger(tmp_path / "all", total_steps=3, rank0_only=False, progress=False)
    every.log(1, {"loss": 1.0})
    every.close()
    assert len((tmp_path / "all" / "metrics.jsonl").read_text().splitlines()) == 1


def test_missing_wandb_warns_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setattr(metrics_log, "_WANDB_WARNED", False)
    with pytest.warns(UserWarning, match="wandb is not installed"):
        a = MetricsLogger(tmp_path / "a", wandb_project="proj", total_steps=2, progress=False)
    a.log(1, {"loss": 1.0})
    a.close()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = MetricsLogger(tmp_path / "b", wandb_project="proj", total_steps=2, progress=False)
    b.close()
    assert (tmp_path / "a" / "metrics.jsonl").exists()


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    """A log file gets a plain line every total/20 steps (and the last step), not a bar redraw per step."""
    stream = _Stream(tty=False)
    with MetricsLogger(tmp_path / "run", total_steps=200, progress_stream=stream, progress_every_s=3600) as log:
        for step in range(1, 201):
            log.log(step, _metrics(step))
    lines = stream.getvalue().splitlines()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, *range(11, 201, 10), 200]
    assert lines[-1].startswith("step 200/200 (100%) | elapsed ") and " s/step | eta 0:00:00 | reward=" in lines[-1]
    assert "loss=0.01 " in lines[-1] and "\r" not in stream.getvalue()

    stream = _Stream(tty=False)  # a resumed run with a time interval of 0: every step prints, counted from the resume
    with MetricsLogger(tmp_path / "resumed", total_steps=30, start_step=20, progress_stream=stream,
                       progress_every_steps=100, progress_every_s=0.0) as log:
        for step in range(21, 31):
            log.log(step, {"loss": 1.0})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("step 21/30 (70%)") and lines[0].endswith("loss=1")


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    stream = _Stream(tty=True)
    with MetricsLogger(tmp_path / "run", total_steps=5, progress_stream=stream) as log:
        assert log._bar is not None and log._lines is None
        for step in range(1, 6):
            log.log(step, {"loss": 1.0})
    assert "\r" in stream.getvalue() and "5/5" in stream.getvalue()
