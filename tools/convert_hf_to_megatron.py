"""HF safetensors checkpoint -> Megatron distributed checkpoint (torch_dist, model only) at a TP/PP layout.

    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-1.5B --save ckpt/q15 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --bf16
    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-1.5B --save ckpt/q15      # TP=PP=1, one process

Run with TP*PP ranks (a multiple adds data-parallel replicas, which write nothing extra). The checkpoint
loads at any other TP/PP (`rlad_megatron.convert.load_megatron_checkpoint`); it appears atomically and
nothing is left at --save on error. `--backend bridge` delegates to Megatron-Bridge's `import_ckpt`
(CUDA + Transformer Engine only; its output has Megatron-Bridge's layout, not ours).
"""

from __future__ import annotations

import argparse
import sys

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model dir (config.json + safetensors)")
    p.add_argument("--save", required=True, help="output Megatron checkpoint dir (must not exist)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="store bf16 weights (default fp32)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save dir")
    p.add_argument("--backend", choices=["native", "bridge"], default="native")
    return p.parse_args(argv)


def convert_native(args: argparse.Namespace) -> None:
    from rlad_megatron import platform
    from rlad_megatron.convert import load_hf_into_megatron, save_megatron_checkpoint
    from rlad_megatron.models.builder import build_model
    from rlad_megatron.models.families import spec_from_hf_config

    spec = spec_from_hf_config(args.hf_dir)  # before any process group: a bad config fails fast
    platform.init(platform.Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size))
    model = build_model(spec, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    load_hf_into_megatron(model, args.hf_dir)
    save_megatron_checkpoint(model, args.save, overwrite=args.overwrite)
    if platform.is_rank0():
        print(f"wrote {args.save}: {spec.family} TP={model.tp} PP={model.pp} padded_vocab={model.padded_vocab} "
              f"dtype={model.config.params_dtype}")


def convert_bridge(args: argparse.Namespace) -> None:
    try:
        from megatron.bridge import AutoBridge
    except ImportError as e:
        raise RuntimeError(
            "--backend bridge needs Megatron-Bridge (`pip install megatron-bridge`, CUDA + Transformer Engine); "
            f"it is not importable here ({e}). Use the default --backend native."
        ) from e
    AutoBridge.import_ckpt(args.hf_dir, args.save)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"native": convert_native, "bridge": convert_bridge}[args.backend](args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileExistsError, RuntimeError) as err:
        sys.exit(f"convert_hf_to_megatron: error: {err}")
