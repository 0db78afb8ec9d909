"""Checkpoint save/resume/reshard (torchrun, 2 ranks) and crash atomicity (SIGKILL during a save)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlad_megatron import checkpoint as ckpt
from tests.conftest import ROOT, torchrun_env

WORKER = ROOT / "tests" / "dist" / "checkpoint_worker.py"


@pytest.mark.slow
def test_resume_bit_exact_and_reshard(tmp_path: Path, torchrun) -> None:
    out = torchrun(WORKER, "dist", tmp_path, nproc=2, timeout=400)
    assert "CHECKPOINT_DIST_OK" in out, out
    for name in ("tp2_plain", "tp1_distopt_fully_reshardable", "tp2_distopt_dp_reshardable_tie", "tp2_plain_bf16"):
        assert f"resume {name}:" in out and "bit-identical" in out
    for name in ("reshard_plain", "reshard_distopt_fully_reshardable", "reshard_distopt_dp_reshardable"):
        assert f"{name}: TP=2 -> TP=1 model equal" in out
    save_dir = tmp_path / "tp2_plain"
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000002", "latest"]
    assert (save_dir / "latest").read_text().strip() == "2"
    it = save_dir / "iter_0000002"
    assert {p.name for p in it.iterdir()} == {"dist", "rng", "train_state.json", "scheduler.json", "rlad_meta.json"}
    assert sorted(p.name for p in (it / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert json.loads((it / "train_state.json").read_text()) == {"consumed_samples": 16, "epoch": 0, "step": 2}
    meta = json.loads((it / "rlad_meta.json").read_text())
    assert meta["padded_vocab"] == 256 and meta["hf_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert meta["saved_layout"] == {"tp": 2, "pp": 1, "world_size": 2}
    assert json.loads((it / "scheduler.json").read_text())["num_steps"] == 2
    assert (it / "dist" / "metadata.json").exists()


def _start(mode: str, save_dir: Path, log: Path) -> subprocess.Popen:
    # own process group: SIGKILL then reaches the dist_checkpointing Manager child too (no orphans)
    return subprocess.Popen([sys.executable, str(WORKER), mode, str(save_dir)], env=torchrun_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while marker not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError(f"{marker!r} never printed (rc={proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_during_save_keeps_latest_loadable(tmp_path: Path) -> None:
    hook_dir, loop_dir = tmp_path / "hook", tmp_path / "loop"
    hook = _start("save_hook", hook_dir, tmp_path / "hook.log")
    loop = _start("save_loop", loop_dir, tmp_path / "loop.log")
    try:
        # killed after every rank wrote step 2 but before the rename
        _wait_for(hook, tmp_path / "hook.log", "sleeping")
        _kill(hook)
        # killed at a random moment of a save-every-step loop
        _wait_for(loop, tmp_path / "loop.log", "saved 3")
        time.sleep(random.uniform(0.0, 0.8))
        _kill(loop)
    finally:
        for p in (hook, loop):
            _kill(p)
    assert ckpt.read_latest(hook_dir) == 1
    assert (hook_dir / ".tmp_iter_0000002").is_dir() and not (hook_dir / "iter_0000002").exists()
    assert ckpt.read_latest(loop_dir) >= 3

    p = subprocess.run([sys.executable, str(WORKER), "verify", str(hook_dir), str(loop_dir)], env=torchrun_env(),
                       capture_output=True, check=False, text=True, timeout=300)
    assert p.returncode == 0 and "CHECKPOINT_VERIFY_OK" in p.stdout, p.stdout[-4000:] + p.stderr[-4000:]
    assert "leftovers ['.tmp_iter_0000002'] cleaned" in p.stdout


def _make_ckpt(root: Path, step: int) -> None:
    (root / ckpt.iter_dir_name(step)).mkdir(parents=True)


def test_latest_resolution(tmp_path: Path) -> None:
    assert ckpt.list_checkpoints(tmp_path / "missing") == [] and ckpt.resolve_step(tmp_path / "missing") is None
    assert ckpt.load_checkpoint(tmp_path / "missing", model=None) == {}
    for s in (3, 10, 7):
        _make_ckpt(tmp_path, s)
    (tmp_path / ".tmp_iter_0000011").mkdir()
    (tmp_path / ".del_iter_0000001.1.2").mkdir()
    (tmp_path / "iter_12").mkdir()  # not a checkpoint name
    assert ckpt.list_checkpoints(tmp_path) == [3, 7, 10]
    assert ckpt.read_latest(tmp_path) is None and ckpt.resolve_step(tmp_path) == 10
    ckpt._write_latest(tmp_path, 7)
    ckpt._write_latest(tmp_path, 3)
    assert (tmp_path / "latest").read_text() == "3\n" and ckpt.resolve_step(tmp_path) == 3
    assert not (tmp_path / ".tmp_latest").exists()
    ckpt._write_latest(tmp_path, 99)
    with pytest.warns(UserWarning, match="iter_0000099 does not exist"):
        assert ckpt.resolve_step(tmp_path) == 10
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(ckpt.CheckpointError, match="expected a step number"):
        ckpt.read_latest(tmp_path)
    ckpt._clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000007", "iter_0000010", "iter_12",
                                                         "latest"]


def test_save_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, 1, model=None, keep_last=0)
    with pytest.raises(ValueError, match="optim_sharding_type"):
        ckpt.save_checkpoint(tmp_path, 1, model=None, optim_sharding_type="dp_zero_gather_scatter")
    with pytest.raises(ValueError, match="train_state"):
        ckpt.save_checkpoint(tmp_path, 1, model=None, train_state={"step": 2})
    assert not any(tmp_path.iterdir())
