"""FP8 on one GPU: start-up validation against this GPU, TE FP8 train steps per recipe (TE + compute capability
>= 8.9; blockwise: >= 9.0 and CUDA >= 12.9), block-FP8 rollout weights."""

from __future__ import annotations

from argparse import Namespace

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fp8_args(fmt="hybrid", recipe="delayed", **kw) -> Namespace:
    return Namespace(fp8_format=fmt, fp8_recipe=recipe, fp8_param_gather=False, rollout_fp8=False,
                     use_distributed_optimizer=False, **kw)


def test_validate_fp8_on_this_gpu():
    from rlad_megatron.fp8 import GpuFacts, validate_fp8

    facts = GpuFacts.probe()
    print(f"\n[gpu fp8] {facts}")
    if facts.capability >= (8, 9) and facts.te:
        assert validate_fp8(fp8_args()) == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_param": False}
    else:
        with pytest.raises(RuntimeError, match="8.9|Transformer Engine") as e:
            validate_fp8(fp8_args())
        print(f"[gpu fp8] refused as expected: {e.value}")
    if facts.capability >= (8, 9):
        assert validate_fp8(Namespace(fp8_format=None, rollout_fp8=True)) == {}


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_train_steps(megatron, tiny_hf_dir, kit, recipe):
    from rlad_megatron.fp8 import GpuFacts, validate_fp8

    facts = GpuFacts.probe()
    if not facts.te:
        pytest.skip("transformer_engine.pytorch is not importable")
    if facts.capability < (8, 9):
        pytest.skip(f"compute capability {facts.capability} < 8.9: no FP8 tensor cores")
    if recipe == "blockwise" and (facts.capability < (9, 0) or (facts.cuda_version or (0,)) < (12, 9)):
        pytest.skip("blockwise FP8 needs compute capability >= 9.0 and CUDA >= 12.9")
    overrides = validate_fp8(fp8_args("e4m3" if recipe == "blockwise" else "hybrid", recipe))
    tokens = kit.random_tokens()
    bf16 = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=True)
    bf16_losses, bf16_times, _ = kit.train_steps(bf16, steps=6, tokens=tokens)
    model = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=True, **overrides)
    losses, times, _ = kit.train_steps(model, steps=6, tokens=tokens)
    print(f"\n[gpu fp8] recipe={recipe} {overrides}: losses {[round(x, 3) for x in losses]} "
          f"(bf16 {[round(x, 3) for x in bf16_losses]}); step {1e3 * sum(times) / len(times):.1f} ms "
          f"vs bf16 {1e3 * sum(bf16_times) / len(bf16_times):.1f} ms (tiny model: overhead-bound)")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
    assert abs(losses[0] - bf16_losses[0]) < 0.1  # same weights, FP8 GEMMs: first loss close to bf16


def test_rollout_fp8_weights_from_a_real_export(megatron, tiny_hf_dir, kit):
    """Megatron -> HF export -> block-FP8 (weight + weight_scale_inv): shapes and reconstruction error."""
    from rlad_megatron.convert import export_hf_weights
    from rlad_megatron.rollout.sglang.fp8_weights import dequantize_block_fp8, quantize_named_tensors

    model = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=False)
    named = [(n, t.clone()) for n, t in export_hf_weights(model, torch.bfloat16)]
    quant = dict(quantize_named_tensors(named))
    worst = 0.0
    for name, t in named:
        if name + "_scale_inv" in quant:
            q, s = quant[name], quant[name + "_scale_inv"]
            assert q.dtype == torch.float8_e4m3fn and q.is_cuda and s.shape == (-(-t.shape[0] // 128),
                                                                                  -(-t.shape[1] // 128))
            worst = max(worst, ((dequantize_block_fp8(q, s) - t.float()).norm() / t.float().norm()).item())
        else:
            assert torch.equal(quant[name], t)  # embeddings, lm_head, norms, biases stay as they are
    print(f"\n[gpu fp8] {sum(n.endswith('_scale_inv') for n in quant)} linear weights quantised; worst relative "
          f"reconstruction error {worst:.4f}")
    assert 0 < worst < 0.05
