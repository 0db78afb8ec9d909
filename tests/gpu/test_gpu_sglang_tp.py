"""A colocated SGLang engine with TP 2 on two GPUs, driven by two training ranks: each engine TP rank loads, over
CUDA IPC, the bucket packed on its own GPU by the training rank there (tests/dist/sglang_tp_worker.py; the CPU lane
runs the same worker with shared-memory payloads). Skips without two GPUs or sglang."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (engine TP 2)")
# a submodule: under pytest the bare tests/sglang/ folder imports as an empty namespace package "sglang"
pytest.importorskip("sglang.srt.server_args", reason="sglang is not installed: pip install -e .[gpu]")

ROOT = Path(__file__).resolve().parents[2]
TOL = 2e-2  # fp32 engine vs fp32 HF forward on GPU (TF32 and kernel differences)


def test_tp2_engine_ranks_load_their_own_gpu_buffers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dirs = []
    for seed in (1, 2):
        cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            Qwen2ForCausalLM(cfg).float().save_pretrained(tmp_path / str(seed))
        dirs.append(str(tmp_path / str(seed)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/dist/sglang_tp_worker.py"), *dirs]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    diffs = {m.group(1): float(m.group(2)) for m in re.finditer(r"^TP (\w+) diff_b=(\S+)", p.stdout, re.MULTILINE)}
    print("\n[gpu sglang tp2] " + ", ".join(f"{k}: {v:.2e}" for k, v in diffs.items()))
    assert diffs["same"] < TOL and diffs["restored"] < TOL and diffs["own"] > 5 * TOL, diffs
