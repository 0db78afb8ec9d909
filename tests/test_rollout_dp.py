"""Data-parallel rollouts in the training loop (2 ranks, gloo): every rank generates, the rollouts do not depend on
the number of engines, engines that drop their weights on release are always pushed before they generate, and a
straggler longer than --distributed-timeout-minutes stops the run with a message naming the flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_torchrun, torchrun_env

pytestmark = pytest.mark.slow  # torchrun


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from rlad_megatron.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("dp") / "student", "test", seed=0)


@pytest.fixture(scope="module")
def runs(student) -> tuple[Path, str]:
    out = student.parent / "runs"
    return out, run_torchrun(ROOT / "tests/dist/rollout_worker.py", out, student, timeout=900)


def test_both_ranks_generate_and_rollouts_do_not_depend_on_the_engine_count(runs):
    out, log = runs
    assert "CASE one_engine OK engines=1" in log and "CASE two_engines OK engines=2" in log, log
    for step in (1, 2):
        one = (out / "one_engine" / "rollouts" / f"rollouts_step{step:06d}.jsonl").read_text()
        two = (out / "two_engines" / "rollouts" / f"rollouts_step{step:06d}.jsonl").read_text()
        assert one == two and one.count("\n") == 16, step


def test_released_weights_are_pushed_before_every_generation(runs):
    _, log = runs
    line = next(x for x in log.splitlines() if x.startswith("CASE released_weights"))
    assert "OK" in line and "drawn=[4.0" not in line, line  # the first step needed more than one round


def test_a_straggler_stops_the_run_naming_the_timeout_flag(student, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "rlad_megatron.train", "--algo", "grpo", "--prompt-data", "builtin:addition", "--no-chat-template",
           "--train-size", "64", "--max-response-len", "8", "--rollout-batch-size", "4", "--n-samples-per-prompt",
           "2", "--micro-batch-size", "4", "--train-iters", "1", "--reward", "tests.loop_rewards:length_parity",
           "--student-hf", str(student), "--output-dir", str(tmp_path / "out"), "--distributed-timeout-minutes",
           "0.5", "--rollout-engine", "tests.fake_engines:slow_engine"]
    p = subprocess.run(cmd, env={**torchrun_env(), "RLAD_TEST_SLOW_ENGINE_S": "60"}, cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode != 0
    line = next((x for x in p.stderr.splitlines() if x.startswith("rlad-train: error: [rank 1]")), "")
    assert "--distributed-timeout-minutes=0.5" in line and "1 of 2 ranks done" in line, p.stderr[-3000:]
    assert "[rank1]: Traceback" not in p.stderr and "atchdog" not in p.stderr, p.stderr[-3000:]
