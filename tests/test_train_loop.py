"""The training loop end to end on tiny random models (CPU, gloo).

One torchrun launch runs every --algo at TP=1/TP=2/PP=2 (tests/dist/train_loop_worker.py); single-
process runs check resume-after-kill equality, bad data, tokenizer mismatch, non-finite detection and the
multi-node example's dry run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, torchrun_env
from tests.dist.train_loop_worker import BASE

pytestmark = pytest.mark.slow  # torchrun / subprocess runs

VOLATILE = ("time", "perf/")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from rlad_megatron.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("tiny")
    return {"student": make_tiny_model(d / "student", "test", seed=0),
            "teacher": make_tiny_model(d / "teacher", "test", seed=1), "dir": d}


def train_cmd(tiny, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlad_megatron.train", *BASE, "--student-hf", str(tiny["student"]), "--teacher-hf",
            str(tiny["teacher"]), "--output-dir", str(out), *extra]


def run(cmd: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**torchrun_env(), **(env_extra or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def test_every_algo_and_layout(torchrun, tiny):
    out = torchrun(ROOT / "tests/dist/train_loop_worker.py", tiny["dir"] / "loop", tiny["student"], tiny["teacher"],
                   timeout=600)
    assert out.count("OK loss=") == 8, out


def test_resume_after_kill_during_save_matches_straight_run(tiny):
    common = ["--algo", "rlad", "--train-iters", "4", "--num-updates-per-rollout", "2"]
    straight = tiny["dir"] / "straight"
    p = run(train_cmd(tiny, straight, *common))
    assert p.returncode == 0, p.stderr[-3000:]

    ckpt, out = tiny["dir"] / "ckpt", tiny["dir"] / "resumed"
    proc = subprocess.Popen(train_cmd(tiny, out, *common, "--save", str(ckpt), "--save-interval", "1"),
                            env={**torchrun_env(), "RLAD_CKPT_TEST_SLEEP_BEFORE_RENAME": "2"}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (ckpt / ".tmp_iter_0000003").exists():  # the third save is being written: kill -9 now
        assert proc.poll() is None and time.time() < deadline, "run ended before the third save"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text().strip() == "2"
    assert not (ckpt / "iter_0000003").exists()

    p = run(train_cmd(tiny, out, *common, "--save", str(ckpt), "--load", str(ckpt)))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = metrics(straight), metrics(out)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert a[step] == b[step], (step, {k: (a[step].get(k), b[step].get(k)) for k in a[step]
                                           if a[step].get(k) != b[step].get(k)})


def test_megatron_checkpoints_as_inputs(tiny, tmp_path):
    """--student-load / --teacher-load: Megatron checkpoints written by tools/convert_hf_to_megatron.py."""
    for who in ("student", "teacher"):
        p = run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(tiny[who]), "--save",
                 str(tmp_path / who), "--tensor-model-parallel-size", "1"])
        assert p.returncode == 0, p.stderr[-3000:]
    cmd = [a for a in train_cmd(tiny, tmp_path / "out", "--algo", "rlad", "--train-iters", "1")
           if a not in (str(tiny["student"]), str(tiny["teacher"]), "--student-hf", "--teacher-hf")]
    p = run([*cmd, "--student-load", str(tmp_path / "student"), "--teacher-load", str(tmp_path / "teacher"),
             "--tokenizer", str(tiny["student"]), "--save-hf", str(tmp_path / "hf_out")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert metrics(tmp_path / "out")[1]["rollout/logp_gap_abs"] < 1e-4
    assert (tmp_path / "hf_out" / "config.json").exists() and (tmp_path / "hf_out" / "tokenizer.json").exists()


def test_bad_prompt_row_names_file_and_line(tiny, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Q0001+0002:", "answer": "3", "task": "addition"}\n{"prompt": "Q0003+0004:"}\n')
    p = run(train_cmd(tiny, tmp_path / "out", "--algo", "grpo", "--prompt-data", str(data)))
    assert p.returncode != 0
    assert f"{data}:2" in p.stderr and "answer" in p.stderr, p.stderr[-2000:]


def test_tokenizer_mismatch_is_refused(tiny, tmp_path):
    import shutil

    other = tmp_path / "teacher_other_tok"
    shutil.copytree(tiny["teacher"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    p = run(train_cmd(tiny, tmp_path / "out", "--algo", "rlad", "--teacher-hf", str(other)))
    assert p.returncode != 0
    assert "tokenizers differ" in p.stderr, p.stderr[-2000:]


def test_non_finite_reward_stops_the_run_naming_the_step(tiny, tmp_path):
    p = run(train_cmd(tiny, tmp_path / "out", "--algo", "grpo", "--reward", "tests.loop_rewards:nan_for_odd"))
    assert p.returncode != 0
    assert "NonFiniteError: step 1: the reward function returned non-finite" in p.stderr, p.stderr[-2000:]


def test_non_finite_weights_stop_the_run_naming_the_step(tiny, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "student_nan"
    shutil.copytree(tiny["student"], bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"][3] = float("nan")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    assert torch.isnan(load_file(bad / "model.safetensors")["model.layers.1.post_attention_layernorm.weight"]).any()
    p = run(train_cmd(tiny, tmp_path / "out", "--algo", "grpo", "--student-hf", str(bad)))
    assert p.returncode != 0
    assert "NonFiniteError: step 1: non-finite student log-probs" in p.stderr, p.stderr[-2000:]


def test_multinode_example_validates_on_cpu():
    script = ROOT / "examples/rlad_7b_to_1.5b.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    for task in ("kk", "math"):
        p = run(["bash", str(script)], {"DRY_RUN": "1", "NNODES": "4", "GPUS_PER_NODE": "8", "TASK": task,
                                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "dry run OK: algo=rlad world=32" in p.stdout, p.stdout


def test_dry_run_rejects_a_bad_layout():
    p = run([sys.executable, "-m", "rlad_megatron.train", "--student-hf", "x", "--teacher-hf", "y", "--prompt-data",
             "builtin:addition", "--tensor-model-parallel-size", "3", "--dry-run"], {"WORLD_SIZE": "8"})
    assert p.returncode != 0 and "does not divide the world size 8" in p.stderr, p.stderr[-2000:]
