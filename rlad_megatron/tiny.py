"""Tiny randomly initialised Qwen2 models over the char tokenizer, for CPU runs and tests.

`make_tiny_model(out_dir, size)` writes a Hugging Face directory (config, safetensors, tokenizer,
generation config) with seeded random weights. The teacher/student pair of the CPU example is then
trained from these by `rlad-train --algo sft --sft-source dataset` (see examples/rlad_tiny_cpu.sh).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

# name -> (hidden, layers, heads, kv heads, ffn)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "teacher": (64, 2, 4, 2, 256),
    "student": (32, 2, 4, 2, 128),
    "test": (32, 2, 4, 2, 64),
}


def tiny_config(size: str = "test", *, arch: str = "qwen2", vocab_size: int | None = None, tie: bool = True,
                max_positions: int = 256):
    """An HF config for a tiny model over the char tokenizer's vocabulary."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    from rlad_megatron.data.char_tokenizer import VOCAB

    hidden, layers, heads, kv, ffn = SIZES[size]
    common = dict(vocab_size=vocab_size or len(VOCAB), hidden_size=hidden, intermediate_size=ffn,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cls, name = {"qwen2": (Qwen2Config, "Qwen2ForCausalLM"), "qwen3": (Qwen3Config, "Qwen3ForCausalLM"),
                 "llama": (LlamaConfig, "LlamaForCausalLM")}[arch]
    if arch == "qwen3":
        common["head_dim"] = hidden // heads
    return cls(architectures=[name], **common)


def make_tiny_model(out_dir: str | Path, size: str = "test", *, seed: int = 0, arch: str = "qwen2",
                    tie: bool = True) -> Path:
    """Write a random tiny HF model + char tokenizer to `out_dir` (atomically: temp dir then rename)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlad_megatron.data.char_tokenizer import build_char_tokenizer

    out_dir = Path(out_dir)
    config = tiny_config(size, arch=arch, tie=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        model.save_pretrained(tmp)
        build_char_tokenizer().save_pretrained(tmp)
        GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=2).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
