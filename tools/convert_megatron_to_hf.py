"""Megatron distributed checkpoint (from tools/convert_hf_to_megatron.py or training) -> HF safetensors.

    python tools/convert_megatron_to_hf.py --load ckpt/q15 --hf-template Qwen2.5-1.5B --save out/q15-hf
    torchrun --nproc_per_node=2 tools/convert_megatron_to_hf.py ... --tensor-model-parallel-size 2

Any world size works (TP*PP must divide it; default TP=PP=1); the checkpoint is resharded on load. The
template supplies config.json, generation_config.json and tokenizer files and must describe the same
model. Output is sharded safetensors + `model.safetensors.index.json`, written atomically.
`--backend bridge` delegates to Megatron-Bridge's `export_ckpt` (CUDA + Transformer Engine only).
"""

from __future__ import annotations

import argparse
import sys


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint dir (has rlad_meta.json)")
    p.add_argument("--hf-template", required=True, help="HF dir providing config/tokenizer files")
    p.add_argument("--save", required=True, help="output HF dir (must not exist)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save dir")
    p.add_argument("--backend", choices=["native", "bridge"], default="native")
    return p.parse_args(argv)


def convert_native(args: argparse.Namespace) -> None:
    from rlad_megatron import platform
    from rlad_megatron.convert import build_model_from_megatron_checkpoint, read_megatron_meta, save_hf_checkpoint

    read_megatron_meta(args.load)  # fails fast on a directory that is not our checkpoint
    platform.init(platform.Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size))
    model = build_model_from_megatron_checkpoint(args.load)
    save_hf_checkpoint(model, args.hf_template, args.save, args.max_shard_size, overwrite=args.overwrite)
    if platform.is_rank0():
        print(f"wrote {args.save}")


def convert_bridge(args: argparse.Namespace) -> None:
    try:
        from megatron.bridge import AutoBridge
    except ImportError as e:
        raise RuntimeError(
            "--backend bridge needs Megatron-Bridge (`pip install megatron-bridge`, CUDA + Transformer Engine); "
            f"it is not importable here ({e}). Use the default --backend native."
        ) from e
    AutoBridge.from_hf_pretrained(args.hf_template).export_ckpt(args.load, args.save)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"native": convert_native, "bridge": convert_bridge}[args.backend](args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileExistsError, RuntimeError) as err:
        sys.exit(f"convert_megatron_to_hf: error: {err}")
