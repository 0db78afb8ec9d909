"""Run a benchmark's own worker under torchrun and collect what each rank wrote (`<out-dir>/rank<r>.json`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_ranks(script: str, worker_args: list[str], *, nproc: int, label: str, timeout: int) -> list[dict]:
    """`torchrun --nproc_per_node=nproc script --worker *worker_args --out-dir D` (1 thread per rank); returns the
    ranks' JSON results in rank order, or raises with the output tail when the run fails or a rank wrote nothing."""
    out_dir = tempfile.mkdtemp(prefix="bench_ranks_")
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
               "--worker", *worker_args, "--out-dir", out_dir]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        ranks = [json.loads(f.read_text()) for f in sorted(Path(out_dir).glob("rank*.json"))]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if len(ranks) != nproc:
        raise RuntimeError(f"{label}: expected {nproc} rank results, got {len(ranks)}")
    return ranks
