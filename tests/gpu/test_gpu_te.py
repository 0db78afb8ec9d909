"""One GPU, Transformer Engine layer spec: log-probs vs HF and bf16 train steps (skips without TE)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def te(megatron):
    from rlad_megatron.models.builder import te_available

    if not te_available():
        pytest.skip("transformer_engine.pytorch is not importable (pip install -e .[gpu])")


def test_te_spec_matches_hf_and_trains(te, tiny_hf_dir, hf_reference, kit):
    from rlad_megatron.models.forward import compute_logprobs

    local = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=False)
    _, local_times, _ = kit.train_steps(local, steps=6)
    model = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=True)
    tokens = kit.random_tokens()
    diff = (compute_logprobs(model, tokens)[0] - kit.hf_logprobs(hf_reference, tokens)).abs().max().item()
    losses, times, _ = kit.train_steps(model, steps=6, tokens=tokens)
    print(f"\n[gpu te] bf16 TE spec: logp diff vs HF fp32 {diff:.3f}; losses {[round(x, 3) for x in losses]}; "
          f"step {1e3 * sum(times) / len(times):.1f} ms (local spec {1e3 * sum(local_times) / len(local_times):.1f} ms)")
    assert diff < 0.1
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
