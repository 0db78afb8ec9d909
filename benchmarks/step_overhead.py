"""Time per RL step of RLAD vs GRPO on the same tiny setup, in one run.

Both runs use the CPU example's shapes (student d=32, teacher d=64, 2 layers, char vocab), 2 ranks
(student TP=1 x DP=2, teacher TP=2), 8 prompts x 8 samples, 60-token responses, 2 updates per rollout.
The models are random (seeded) so every response runs to the length limit and both methods see the same
work per step. RLAD adds one teacher forward per step (no backward). Prints per-phase means over the
steps after the warm-up and the RLAD/GRPO ratio.

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py [--steps 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ["rollout", "old_logp", "teacher", "update", "sync", "step"]


def write_prompts(path: Path, n: int = 4096) -> None:
    """Column-addition prompts as a JSONL file (no reasoning-gym needed, e.g. on a bare GPU image)."""
    import random

    from rlad_megatron.data.addition import addition_prompt

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            terms = [rng.randrange(10_000) for _ in range(rng.choice((2, 3)))]
            f.write(json.dumps({"prompt": addition_prompt(terms), "answer": str(sum(terms)), "task": "addition"}) + "\n")


def run(algo: str, work: Path, steps: int, teacher_tp: int, nproc: int, tag: str) -> list[dict]:
    out = work / f"{algo}_{tag}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "rlad_megatron.train", "--algo", algo, "--student-hf", str(work / "student"), "--teacher-hf",
           str(work / "teacher"), "--teacher-tensor-model-parallel-size", str(teacher_tp), "--prompt-data", str(work / "prompts.jsonl"),
           "--no-chat-template", "--rollout-batch-size", "8", "--n-samples-per-prompt", "8",
           "--micro-batch-size", "32", "--num-updates-per-rollout", "2", "--max-response-len", "60", "--lr", "1e-5",
           "--train-iters", str(steps), "--reward", "addition", "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="GRPO and RLAD runs alternate, this many times each")
    p.add_argument("--teacher-tp", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes or GPUs)")
    a = p.parse_args()
    from rlad_megatron.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tiny_model(work / "student", "student", seed=2)
        make_tiny_model(work / "teacher", "teacher", seed=1)
        write_prompts(work / "prompts.jsonl")
        rows: dict[str, list[dict]] = {"grpo": [], "rlad": []}
        for i in range(a.rounds):  # alternate so load from other jobs hits both methods alike
            for algo in ("grpo", "rlad"):
                rows[algo] += [r for r in run(algo, work, a.steps, a.teacher_tp, a.nproc, str(i)) if r["step"] > a.warmup]
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    print(f"{where}, {a.nproc} rank(s), teacher TP={a.teacher_tp}; {a.rounds} alternating runs per method; "
          f"steps {a.warmup + 1}-{a.steps}")
    print("| phase (s/step, median) | GRPO | RLAD | RLAD / GRPO |")
    print("|---|---:|---:|---:|")
    for phase in PHASES:
        key = f"perf/{phase}_s"
        g = statistics.median(r.get(key, 0.0) for r in rows["grpo"])
        r = statistics.median(r.get(key, 0.0) for r in rows["rlad"])
        ratio = f"{r / g:.3f}" if g > 0 else "-"
        print(f"| {phase} | {g:.4f} | {r:.4f} | {ratio} |")
    tok = {k: statistics.fmean(r["rollout/response_len"] for r in v) for k, v in rows.items()}
    print(f"\nmean response length: GRPO {tok['grpo']:.1f}, RLAD {tok['rlad']:.1f} tokens")


if __name__ == "__main__":
    main()
