"""Data-parallel rollouts on remote SGLang servers (the SGLang lane): two CPU servers behind sglang-router, two
training ranks as clients. The servers and the router run here (the lane venv); the trainer runs in the project's
venv (Megatron, no sglang), as a real deployment would: tests/dist/sglang_remote_worker.py under torchrun.

Checked: a step's rollouts are split across both servers; rank 0's distributed weight update reaches both (before
it the engines are far from the student, after it every rollout's log-probs match Megatron's forward on both); a
second update after the student changed reaches both too.

Needs the trainer's Python: $RLAD_TRAINER_PYTHON, else the repo's .venv/bin/python; skipped when neither imports
megatron.core.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.server_args", reason="sglang is not installed: see docs/sglang_cpu_lane.md")
pytest.importorskip("sglang_router", reason="sglang-router is not installed: see docs/sglang_cpu_lane.md")

from rlad_megatron.rollout.sglang.server import ServerProcess, free_port, wait_until_healthy
from rlad_megatron.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TOL = 2e-3  # fp32 engine vs fp32 Megatron forward on CPU
SERVER_KW = {"dtype": "float32", "random_seed": 0, "skip_tokenizer_init": True, "device": "cpu",
             "attention_backend": "torch_native", "max_total_tokens": 8192}


def trainer_python() -> str | None:
    for cand in (os.environ.get("RLAD_TRAINER_PYTHON"), str(ROOT / ".venv/bin/python")):
        if cand and Path(cand).exists() and subprocess.run([cand, "-c", "import megatron.core"],
                                                           capture_output=True, check=False).returncode == 0:
            return cand
    return None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The student (what the trainer loads), two servers started from a different model, and a router."""
    if trainer_python() is None:
        pytest.skip("no trainer Python with megatron.core: set RLAD_TRAINER_PYTHON to the project venv's python")
    root = tmp_path_factory.mktemp("sglang_dp")
    student = make_tiny_model(root / "student", "test", seed=0)
    other = make_tiny_model(root / "other", "test", seed=1)
    servers = []
    router = None
    try:
        with ThreadPoolExecutor(2) as pool:  # start-ups overlap
            futures = [pool.submit(ServerProcess, {"model_path": str(other), **SERVER_KW},
                                   log_path=root / f"server{i}.log") for i in range(2)]
            errors = [f.exception() for f in futures if f.exception() is not None]
            servers += [f.result() for f in futures if f.exception() is None]  # stopped below either way
            if errors:
                raise errors[0]
        port = free_port()
        with open(root / "router.log", "wb") as log:  # the child keeps its own copy of the fd
            router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                                       "--port", str(port), "--worker-urls", *(s.url for s in servers)],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, 120, proc=router, log_path=root / "router.log")
        yield {"root": root, "student": student, "router": url, "servers": servers}
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for s in servers:
            s.stop()


def parse_rounds(log: str) -> dict:
    rounds = {}
    pattern = r"^ROUND (\w+) counts=(\{.*?\}) ranks=(\{.*?\}) maxdiff=(\{.*?\}) clients=(\d+)"
    for m in re.finditer(pattern, log, re.MULTILINE):
        rounds[m.group(1)] = (*(ast.literal_eval(m.group(k)) for k in (2, 3, 4)), int(m.group(5)))
    return rounds


def test_rollouts_split_across_servers_and_weight_updates_reach_both(deployment):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(ROOT))
    cmd = [trainer_python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/sglang_remote_worker.py"), str(deployment["root"] / "run"),
           str(deployment["student"]), deployment["router"]]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    print("\n" + "\n".join(x for x in p.stdout.splitlines() if x.startswith(("ROUND", "SYNC"))))
    rounds = parse_rounds(p.stdout)
    assert set(rounds) == {"before", "synced", "updated"}, p.stdout
    for name, (counts, ranks, worst, clients) in rounds.items():
        assert clients == 2 and set(ranks) == {0, 1}, (name, clients, ranks)  # both ranks generated
        assert set(counts) == {f"{name}@0", f"{name}@1"}, (name, counts)  # both servers served rollouts
        assert sum(counts.values()) == 32 and min(counts.values()) >= 4, (name, counts)
        if name == "before":  # the servers' start-up model is not the student: the check can fail
            assert min(worst.values()) > 50 * TOL, (name, worst)
        else:
            assert max(worst.values()) < TOL, (name, worst)
