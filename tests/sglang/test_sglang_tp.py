"""A colocated SGLang engine with TP 2 over two training ranks (the SGLang lane, CPU, gloo): each engine TP rank
loads the weight bucket of the training rank on its own device (tests/dist/sglang_tp_worker.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang.srt.server_args", reason="sglang is not installed: see docs/sglang_cpu_lane.md")
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
TOL = 2e-3


def save_model(path: Path, seed: int) -> Path:
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Qwen2ForCausalLM(cfg).float().save_pretrained(path)
    return path


def test_each_engine_tp_rank_loads_its_own_training_ranks_bucket(tmp_path):
    a, b = save_model(tmp_path / "a", 1), save_model(tmp_path / "b", 2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not torch.cuda.is_available():  # SGLang on CPU gives each TP rank a NUMA node, or the cores named here
        ncpu = os.cpu_count() or 2
        env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", f"0-{ncpu // 2 - 1}|{ncpu // 2}-{ncpu - 1}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/sglang_tp_worker.py"), str(a), str(b)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    diffs = {m.group(1): float(m.group(2)) for m in re.finditer(r"^TP (\w+) diff_b=(\S+)", p.stdout, re.MULTILINE)}
    print("\n" + "\n".join(x for x in p.stdout.splitlines() if x.startswith("TP ")))
    assert diffs["same"] < TOL and diffs["restored"] < TOL, diffs
    assert diffs["own"] > 50 * TOL, diffs  # TP rank 1 loaded rank 1's model A, not the leader's B
