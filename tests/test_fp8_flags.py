"""FP8 flags: parsing, start-up validation (clear errors on CPU and on GPUs that cannot run the recipe), and the
block-FP8 rollout quantiser (round-trip error, scale layout, HF names) -- all on CPU."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from rlad_megatron.fp8 import GpuFacts, add_fp8_args, ddp_overrides, validate_fp8
from rlad_megatron.rollout.sglang.fp8_weights import (
    FP8_E4M3_MAX,
    dequantize_block_fp8,
    fp8_eligible,
    prepare_fp8_model_dir,
    quantize_block_fp8,
    quantize_hf_checkpoint,
    quantize_named_tensors,
)

HOPPER = GpuFacts(cuda=True, capability=(9, 0), cuda_version=(12, 9), te=True, name="H100")


def parse(*argv: str) -> argparse.Namespace:
    return add_fp8_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_parse_with_megatron_names():
    a = parse()
    assert (a.fp8_format, a.fp8_recipe, a.fp8_param_gather, a.rollout_fp8, a.rollout_fp8_block) == (
        None, "delayed", False, False, [128, 128])
    a = parse("--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-param-gather", "--rollout-fp8",
              "--rollout-fp8-block", "64", "32")
    assert (a.fp8_format, a.fp8_recipe, a.fp8_param_gather, a.rollout_fp8, a.rollout_fp8_block) == (
        "e4m3", "blockwise", True, True, [64, 32])
    with pytest.raises(SystemExit):
        parse("--fp8-format", "e5m2")
    with pytest.raises(SystemExit):
        parse("--fp8-recipe", "mxfp8")


def test_project_cli_takes_the_flags():
    from rlad_megatron.arguments import build_parser

    a, _ = build_parser().parse_known_args(["--fp8-format", "hybrid", "--fp8-recipe", "tensorwise"])
    assert a.fp8_format == "hybrid" and a.fp8_recipe == "tensorwise"


def test_nothing_asked_nothing_checked():
    assert validate_fp8(parse(), GpuFacts(cuda=False)) == {}
    with pytest.raises(ValueError, match="--fp8-param-gather needs --fp8-format"):
        validate_fp8(parse("--fp8-param-gather"), GpuFacts(cuda=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp8_on_cpu_is_refused_clearly():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        validate_fp8(parse("--fp8-format", "hybrid"))
    with pytest.raises(RuntimeError, match="--rollout-fp8 needs a CUDA GPU"):
        validate_fp8(parse("--rollout-fp8"))


@pytest.mark.parametrize("argv,facts,match", [
    (("--fp8-format", "e4m3"), GpuFacts(True, (8, 0), (12, 4), True, "A100"), "8.9.*A100 is 8.0"),
    (("--rollout-fp8",), GpuFacts(True, (8, 6), (12, 4), False, "A10"), "8.9"),
    (("--fp8-format", "hybrid"), GpuFacts(True, (8, 9), (12, 4), False, "L4"), "Transformer Engine"),
    (("--fp8-format", "e4m3", "--fp8-recipe", "blockwise"), GpuFacts(True, (8, 9), (12, 9), True, "L40S"),
     "blockwise needs compute capability >= 9.0"),
    (("--fp8-format", "e4m3", "--fp8-recipe", "blockwise"), GpuFacts(True, (9, 0), (12, 4), True, "H100"),
     "CUDA >= 12.9.*12.4"),
])
def test_gpu_that_cannot_run_it_is_refused(argv, facts, match):
    with pytest.raises(RuntimeError, match=match):
        validate_fp8(parse(*argv), facts)


def test_overrides_are_transformer_config_fields():
    from megatron.core.transformer import TransformerConfig

    args = parse("--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-param-gather")
    args.use_distributed_optimizer = True
    out = validate_fp8(args, HOPPER)
    assert out == {"fp8": "e4m3", "fp8_recipe": "blockwise", "fp8_param": True}
    assert set(out) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    assert ddp_overrides(args) == {"fp8_param_gather": True}
    args.use_distributed_optimizer = False
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        validate_fp8(args, HOPPER)
    assert validate_fp8(parse("--rollout-fp8"), HOPPER) == {}  # rollout-only FP8 changes nothing in training


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((65, 33), (64, 32)),
                                         ((5, 7), (128, 128))])
def test_block_fp8_round_trip_and_scale_layout(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[1])  # columns of very different scale
    q, s = quantize_block_fp8(w, block)
    rows, cols = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (rows, cols)
    d = dequantize_block_fp8(q, s, block)
    for i in range(rows):
        for j in range(cols):
            blk = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            amax = w[blk].abs().max()
            assert s[i, j] == amax / FP8_E4M3_MAX  # the block max maps onto +-448
            assert q[blk].float().abs().max() == FP8_E4M3_MAX
            # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4, absolute floor at the subnormals
            err = (d[blk] - w[blk]).abs()
            assert (err <= w[blk].abs() * 2**-4 + s[i, j] * 2**-9).all()


def test_zero_block_and_bf16_input():
    w = torch.zeros(128, 256, dtype=torch.bfloat16)
    w[:, 128:] = 1.5
    q, s = quantize_block_fp8(w)
    assert torch.equal(dequantize_block_fp8(q, s, dtype=torch.bfloat16), w)
    assert s[0, 0] > 0 and s[0, 1] == 1.5 / FP8_E4M3_MAX
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.zeros(4))


def test_hf_name_mapping():
    named = [("model.embed_tokens.weight", torch.randn(64, 32)), ("model.layers.0.input_layernorm.weight",
                                                                    torch.ones(32)),
             ("model.layers.0.self_attn.q_proj.weight", torch.randn(32, 32)),
             ("model.layers.0.self_attn.q_proj.bias", torch.randn(32)),
             ("model.layers.0.mlp.down_proj.weight", torch.randn(32, 64)), ("lm_head.weight", torch.randn(64, 32))]
    out = quantize_named_tensors(named)
    names = [n for n, _ in out]
    assert names == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv",
                     "model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.0.mlp.down_proj.weight_scale_inv", "lm_head.weight"]
    kept = dict(out)
    assert kept["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert kept["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 1)
    assert kept["lm_head.weight"] is named[-1][1] and not fp8_eligible("model.norm.weight", torch.ones(2, 2))


def test_fp8_checkpoint_and_dummy_model_dir(tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = tmp_path / "bf16"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(src)
    dummy = prepare_fp8_model_dir(src, tmp_path / "dummy")
    assert not list(dummy.glob("*.safetensors"))
    cfg = json.loads((dummy / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    dst = quantize_hf_checkpoint(src, tmp_path / "fp8")
    before, after = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    w = before["model.layers.0.mlp.up_proj.weight"]
    rec = dequantize_block_fp8(after["model.layers.0.mlp.up_proj.weight"],
                               after["model.layers.0.mlp.up_proj.weight_scale_inv"])
    assert ((rec - w).norm() / w.norm()) < 0.05
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
