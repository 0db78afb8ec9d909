"""The whole `rlad-train` loop on one GPU (nccl, CUDA models, HF engine on CUDA): RLAD with a teacher,
fp32 and bf16. Prompts come from a JSONL file so the GPU image needs no reasoning-gym."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rlad_megatron.data.addition import addition_prompt
    from rlad_megatron.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("gpu_loop")
    make_tiny_model(d / "student", "student", seed=2)
    make_tiny_model(d / "teacher", "teacher", seed=1)
    gen = torch.Generator().manual_seed(0)
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(256):
            terms = torch.randint(0, 10_000, (2,), generator=gen).tolist()
            f.write(json.dumps({"prompt": addition_prompt(terms), "answer": str(sum(terms)), "task": "addition"}) + "\n")
    return d


@pytest.mark.parametrize("dtype_flags", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_rlad_loop_on_gpu(setup, dtype_flags, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlad_megatron.train", "--algo", "rlad", "--student-hf", str(setup / "student"),
           "--teacher-hf", str(setup / "teacher"), "--prompt-data", str(setup / "prompts.jsonl"), "--eval-data",
           str(setup / "prompts.jsonl"), "--eval-size", "64", "--no-chat-template", "--reward",
           "tests.loop_rewards:length_parity", "--rollout-batch-size", "8", "--n-samples-per-prompt", "8",
           "--micro-batch-size", "16", "--num-updates-per-rollout", "2", "--max-response-len", "48", "--lr", "1e-4",
           "--train-iters", "6", "--check-weight-sync", "--output-dir", str(out), *dtype_flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6
    tol = 2e-2 if dtype_flags else 2e-3  # engine (HF, cuBLAS/SDPA) vs Megatron kernels on the same weights
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["rollout/logp_gap_abs"] < tol, r["rollout/logp_gap_abs"]
    assert any(r["grad_norm"] > 0 for r in steps)
    mean = lambda k: sum(r[k] for r in steps[2:]) / len(steps[2:])
    print(f"\n[gpu loop {'bf16' if dtype_flags else 'fp32'}] step {mean('perf/step_s') * 1e3:.0f} ms "
          f"(rollout {mean('perf/rollout_s') * 1e3:.0f}, old_logp {mean('perf/old_logp_s') * 1e3:.0f}, teacher "
          f"{mean('perf/teacher_s') * 1e3:.0f}, update {mean('perf/update_s') * 1e3:.0f}); train-vs-rollout "
          f"|dlogp| {mean('rollout/logp_gap_abs'):.2e}; sync probe {steps[-1].get('sync/probe_logp_max_diff')}")
