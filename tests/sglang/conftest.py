"""SGLang contract lane: real SGLang against the same checks as the HF engine.

Skipped unless `import sglang` works (see docs/sglang_cpu_lane.md for the CPU install). On a CPU-only box this file
puts the `sgl_kernel` import stub (cpu_stub/) on sys.path and PYTHONPATH (SGLang's child processes need it too)
when no real `sgl_kernel` imports, and sets SGLANG_USE_CPU_ENGINE=1.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

STUB = Path(__file__).resolve().parent / "cpu_stub"

if not torch.cuda.is_available():
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if importlib.util.find_spec("sgl_kernel") is None:
        sys.path.insert(0, str(STUB))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(STUB), os.environ.get("PYTHONPATH", "")])
