"""Shared fixtures. Multi-rank tests launch `torchrun --nproc_per_node=N` workers (gloo on CPU);
each launch costs ~10 s of imports, so a worker script runs many checks per launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def torchrun_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_torchrun(script: str | Path, *args, nproc: int = 2, timeout: int = 300) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    p = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
    return p.stdout


@pytest.fixture
def torchrun():
    return run_torchrun


def pytest_collection_modifyitems(items) -> None:
    """A test that launches torchrun workers is slow whether or not it says so."""
    for item in items:
        if "torchrun" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
