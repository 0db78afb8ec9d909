"""Multi-rank checks of `rlad_megatron.convert`, run by tests/test_convert.py as
`torchrun --nproc_per_node=2 tests/dist/convert_worker.py ROOT` where ROOT holds the tiny HF models that
`make_hf_model` wrote (one subdir per case). Switches layouts in one launch:

* TP=1 (DP=2), TP=2, PP=2: HF -> Megatron logits vs `transformers` (< 1e-4 fp32; PP=2 through Megatron's
  forward-only pipeline schedule) and HF -> Megatron -> HF (`export_hf_weights`) bit-exact, every tensor;
* Megatron dist checkpoints saved at TP=2 / PP=2 and loaded at TP=1 / TP=2: identical weights and logits;
* tools/convert_hf_to_megatron.py at TP=2 then tools/convert_megatron_to_hf.py at TP=1 (DP=2): bit-exact;
  the HF->Megatron tool with TP not dividing the KV heads fails with a clear error and writes nothing.

Rank 0 prints one `RESULT {json}` line with every measured max |logit diff|.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SEQ, BATCH = 24, 2


def _case(cls: str, arch: str, *, vocab: int, heads: int, kv: int, tied: bool, **extra) -> tuple[str, str, dict]:
    shape = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": heads,
             "num_key_value_heads": kv, "tie_word_embeddings": tied}
    return cls, arch, {**shape, **extra}


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# case -> (config class name, architecture, config kwargs); vocab 200/300 exercise the padding
CASES: dict[str, tuple[str, str, dict]] = {
    "qwen2_untied": _case("Qwen2Config", "Qwen2ForCausalLM", vocab=200, heads=4, kv=2, tied=False),
    "qwen2_tied": _case("Qwen2Config", "Qwen2ForCausalLM", vocab=300, heads=4, kv=2, tied=True),
    "qwen3": _case("Qwen3Config", "Qwen3ForCausalLM", vocab=200, heads=4, kv=2, tied=True, head_dim=32),
    "llama3": _case("LlamaConfig", "LlamaForCausalLM", vocab=200, heads=8, kv=2, tied=False,
                    max_position_embeddings=128, rope_parameters=LLAMA3_ROPE),
    "mha": _case("Qwen2Config", "Qwen2ForCausalLM", vocab=256, heads=4, kv=4, tied=False),
    # KV heads not divisible by TP=2 (bad input for the TP=2 tool run)
    "mqa": _case("LlamaConfig", "LlamaForCausalLM", vocab=200, heads=4, kv=1, tied=False),
}
LOGIT_CASES = ("qwen2_untied", "qwen2_tied", "qwen3", "llama3", "mha")


def make_hf_model(case: str, out: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a tiny random HF model for `case`. Weights are redrawn at O(0.1-1) scale and norms around 1
    so a swapped/misplaced tensor changes the logits visibly."""
    import transformers

    cls_name, arch, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(architectures=[arch], num_hidden_layers=2, rms_norm_eps=1e-6, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "bias" not in name else 0.5)
    model.to(dtype).save_pretrained(out)
    transformers.GenerationConfig(eos_token_id=1, pad_token_id=0).save_pretrained(out)
    (Path(out) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}) + "\n")
    return Path(out)


def rewrite_checkpoint(src: Path, out: Path, edit) -> Path:
    """Copy an HF dir, passing its tensors through `edit(dict) -> dict`."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, out)
    tensors = edit(hf_tensors(src))
    (out / "model.safetensors").unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def make_bad_checkpoints(root: Path) -> None:
    """Broken variants of `root/qwen2_untied` (and a tied one with a redundant lm_head) under `root`."""
    src, tied = root / "qwen2_untied", root / "qwen2_tied"

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        return t

    rewrite_checkpoint(src, root / "bad_missing", drop)
    rewrite_checkpoint(src, root / "bad_extra", lambda t: {**t, "model.layers.0.mlp.extra_proj.weight": torch.zeros(4)})
    rewrite_checkpoint(src, root / "bad_shape", lambda t: {**t, "model.layers.0.self_attn.k_proj.weight":
                                                           torch.zeros(48, 64)})
    rewrite_checkpoint(tied, root / "tied_lm_head", lambda t: {**t, "lm_head.weight":
                                                               t["model.embed_tokens.weight"].clone()})
    other = rewrite_checkpoint(src, root / "other_model", lambda t: t)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits `[b, s, vocab]` on the last pipeline stage (None elsewhere), run through
    Megatron's forward-only schedule (pipelined when PP>1)."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def step(data_iterator, module):
        ids = next(data_iterator)
        return module(ids, positions, None), None

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[model.module], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
        )
    if not model.is_last_stage:
        return None
    local = out[0]
    parts = [torch.empty_like(local) for _ in range(model.tp)]
    dist.all_gather(parts, local.contiguous(), group=model.pg.tp)
    return torch.cat(parts, dim=-1)[..., : model.spec.vocab_size]


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def assert_bit_exact(exported: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert exported.keys() == reference.keys(), (what, sorted(exported.keys() ^ reference.keys()))
    for name, ref in reference.items():
        got = exported[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, (what, name, got.dtype, got.shape, ref.shape)
        assert torch.equal(got.cpu(), ref), (what, name, (got.cpu() - ref).abs().max().item())


def expect_error(exc: type[BaseException], needle: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert needle in str(e), f"{fn.__name__}: {e!r} does not mention {needle!r}"
        return
    raise AssertionError(f"{fn.__name__} did not raise {exc.__name__} ({needle})")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(root: Path) -> None:
    import torch.distributed as dist

    from rlad_megatron import platform
    from rlad_megatron.convert import (
        build_model_from_megatron_checkpoint,
        export_hf_weights,
        load_hf_into_megatron,
        load_megatron_checkpoint,
        megatron_to_hf,
        save_hf_checkpoint,
        save_megatron_checkpoint,
    )
    from rlad_megatron.models.builder import build_model
    from rlad_megatron.models.families import spec_from_hf_config

    platform.init(platform.Layout(1, 1))
    rank = dist.get_rank()
    work = root / "work"  # shared scratch (same filesystem for both ranks)
    results: dict[str, float] = {}
    reference = {case: hf_logits(root / case, tokens_for(CASES[case][2]["vocab_size"])) for case in LOGIT_CASES}
    weights = {case: hf_tensors(root / case) for case in LOGIT_CASES}
    logits_at: dict[tuple[str, str], torch.Tensor] = {}

    def check(model, case: str, tag: str) -> None:
        got = megatron_logits(model, tokens_for(model.spec.vocab_size))
        if got is not None:
            diff = (got - reference[case]).abs().max().item()
            results[f"{case}/{tag}"] = diff
            assert diff < 1e-4, f"{case} at {tag}: max |logit diff| {diff}"
            logits_at[case, tag] = got

    # ---- HF -> Megatron logits and HF -> Megatron -> HF at three layouts; dist checkpoints at TP=2 / PP=2
    for tag, layout in (("tp1", platform.Layout(1, 1)), ("tp2", platform.Layout(2, 1)), ("pp2", platform.Layout(1, 2))):
        platform.initialize_parallel(layout)
        for case in LOGIT_CASES:
            model = build_model(spec_from_hf_config(root / case))
            load_hf_into_megatron(model, root / case)
            check(model, case, tag)
            assert_bit_exact(dict(export_hf_weights(model)), weights[case], f"{case} export at {tag}")
            if (tag, case) in (("tp2", "qwen2_tied"), ("tp2", "llama3"), ("pp2", "qwen3"), ("pp2", "qwen2_untied")):
                save_megatron_checkpoint(model, work / f"{case}-{tag}")
        dist.barrier()

    # ---- resharding: load those checkpoints at TP=1 (DP=2) and TP=2: same weights, same logits
    for tag, layout in (("tp1", platform.Layout(1, 1)), ("tp2", platform.Layout(2, 1))):
        platform.initialize_parallel(layout)
        for saved in ("qwen2_tied-tp2", "llama3-tp2", "qwen3-pp2", "qwen2_untied-pp2"):
            case = saved.split("-")[0]
            model = build_model_from_megatron_checkpoint(work / saved)
            assert_bit_exact(dict(export_hf_weights(model)), weights[case], f"{saved} loaded at {tag}")
            got = megatron_logits(model, tokens_for(model.spec.vocab_size))
            assert torch.equal(got, logits_at[case, tag]), f"{saved} at {tag}: logits differ from the HF-loaded model"
            results[f"{saved}->{tag}"] = (got - reference[case]).abs().max().item()

    # ---- the command-line tools, in process: HF -> Megatron at TP=2, Megatron -> HF at TP=1 (DP=2)
    to_mcore, to_hf = load_tool("convert_hf_to_megatron"), load_tool("convert_megatron_to_hf")
    to_mcore.main(["--hf-dir", str(root / "qwen2_tied"), "--save", str(work / "tool-mcore"),
                   "--tensor-model-parallel-size", "2"])
    to_hf.main(["--load", str(work / "tool-mcore"), "--hf-template", str(root / "qwen2_tied"),
                "--save", str(work / "tool-hf"), "--max-shard-size", "40000"])
    out = work / "tool-hf"
    assert len(list(out.glob("model-*.safetensors"))) > 1, sorted(p.name for p in out.iterdir())
    assert_bit_exact(hf_tensors(out), weights["qwen2_tied"], "tools round trip")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        assert (out / name).exists(), name
    try:
        to_mcore.main(["--hf-dir", str(root / "mqa"), "--save", str(work / "tool-mqa"),
                       "--tensor-model-parallel-size", "2"])
        raise AssertionError("TP=2 with 1 KV head did not fail")
    except ValueError as e:
        assert "num_key_value_heads=1" in str(e), e
    dist.barrier()
    assert not (work / "tool-mqa").exists() and not (work / ".tool-mqa.tmp").exists()

    # ---- more inputs at TP=1 (DP=2): a sharded (index) HF dir, a tied dir that also stores lm_head, bf16
    platform.initialize_parallel(platform.Layout(1, 1))
    tied = build_model(spec_from_hf_config(root / "qwen2_tied"))
    for src in (out, root / "tied_lm_head"):
        load_hf_into_megatron(tied, src)
        check(tied, "qwen2_tied", f"tp1-from-{src.name}")
    bf16_dir = root / "qwen3_bf16"
    for dtype in (torch.bfloat16, torch.float32):
        m = build_model(spec_from_hf_config(bf16_dir), params_dtype=dtype)
        load_hf_into_megatron(m, bf16_dir)
        assert_bit_exact(dict(export_hf_weights(m)), hf_tensors(bf16_dir), f"bf16 HF via {dtype} Megatron")

    # ---- bad input: the same clear error on every rank, nothing written
    model = build_model(spec_from_hf_config(root / "qwen2_untied"))
    for bad, needle in (
        ("bad_missing", "missing tensor model.layers.1.mlp.up_proj.weight"),
        ("bad_extra", "unexpected tensor model.layers.0.mlp.extra_proj.weight"),
        ("bad_shape", "tensor model.layers.0.self_attn.k_proj.weight has shape [48, 64], expected [32, 64]"),
        ("other_model", "ffn_hidden_size: model has 96"),
    ):
        expect_error(ValueError, needle, load_hf_into_megatron, model, root / bad)
    expect_error(ValueError, "different model", load_megatron_checkpoint, model, work / "qwen2_tied-tp2")
    wrong_pad = build_model(spec_from_hf_config(root / "qwen2_tied"))  # TP=1 pads 300 -> 384, saved at TP=2: 512
    expect_error(ValueError, "padded vocab 512", load_megatron_checkpoint, wrong_pad, work / "qwen2_tied-tp2")
    expect_error(ValueError, "different model", save_hf_checkpoint, model, root / "qwen3", work / "never")
    real_save, calls = megatron_to_hf.save_file, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_save(*args, **kwargs)

    megatron_to_hf.save_file = failing_save if rank == 0 else real_save
    expect_error(OSError if rank == 0 else RuntimeError, "disk full" if rank == 0 else "failed on rank 0",
                 save_hf_checkpoint, model, root / "qwen2_untied", work / "never", max_shard_bytes=20000)
    megatron_to_hf.save_file = real_save
    dist.barrier()
    assert not (work / "never").exists() and not (work / ".never.tmp").exists()

    merged: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(merged, results)  # PP=2 diffs live on the last stage
    if rank == 0:
        print("RESULT " + json.dumps({k: v for r in merged for k, v in sorted(r.items())}), flush=True)
    platform.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
