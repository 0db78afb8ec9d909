"""HF safetensors checkpoint -> Megatron distributed checkpoint (torch_dist, model only) at a TP/PP layout.

    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-1.5B --save ckpt/q15 \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --bf16
    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-1.5B --save ckpt/q15      # TP=PP=1, one process

Run with TP*PP ranks (a multiple adds data-parallel replicas, which write nothing extra). The checkpoint
loads at any other TP/PP (`rlad_megatron.convert.load_megatron_checkpoint`); it appears atomically and
nothing is left at --save on error. Bad input (config, a truncated safetensors file, a layout the heads or
layers do not split into, an existing --save) is one line on stderr and exit code 2, before anything is built.
`--backend bridge` delegates to Megatron-Bridge's `import_ckpt` (CUDA + Transformer Engine only; its output has
Megatron-Bridge's layout, not ours).
"""

from __future__ import annotations

import argparse
from pathlib import Path

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


def check_inputs(args: argparse.Namespace):
    """Every check that needs no process group (UserError naming the flag): the config, the safetensors headers
    (a truncated file is named), heads/layers vs TP/PP, the world size, the output path. Returns the ModelSpec."""
    from rlad_megatron.convert.hf_to_megatron import SafetensorsCheckpoint, check_hf_checkpoint
    from rlad_megatron.errors import OutputExistsError, UserError, as_user_error
    from rlad_megatron.models.families import spec_from_hf_config
    from rlad_megatron.preflight import check_model_layout, world_size

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    with as_user_error(flag="--hf-dir"):
        spec = spec_from_hf_config(args.hf_dir)
        with SafetensorsCheckpoint(args.hf_dir) as ckpt:
            check_hf_checkpoint(ckpt, spec)
    check_model_layout("model", spec, tp, pp, tp_flag="--tensor-model-parallel-size",
                       pp_flag="--pipeline-model-parallel-size")
    if world_size() % (tp * pp):
        raise UserError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not divide the "
                        f"world size {world_size()} (run with TP*PP ranks, or a multiple)")
    if Path(args.save).exists() and not args.overwrite:
        raise OutputExistsError(f"--save {args.save}: already exists (pass --overwrite to replace it)")
    return spec


def convert_native(args: argparse.Namespace) -> None:
    from rlad_megatron import platform
    from rlad_megatron.convert import load_hf_into_megatron, save_megatron_checkpoint
    from rlad_megatron.models.builder import build_model

    spec = check_inputs(args)  # before any process group: bad input fails fast, on every rank alike
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
        from rlad_megatron.errors import UserError

        raise UserError(
            "--backend bridge needs Megatron-Bridge (`pip install megatron-bridge`, CUDA + Transformer Engine); "
            f"it is not importable here ({e}). Use the default --backend native."
        ) from e
    AutoBridge.import_ckpt(args.hf_dir, args.save)


def main(argv: list[str] | None = None) -> None:
    """Convert; raises on bad input (in-process use). The command line wraps it (`errors.run_cli`)."""
    args = parse_args(argv)
    {"native": convert_native, "bridge": convert_bridge}[args.backend](args)


if __name__ == "__main__":
    from rlad_megatron.errors import run_cli

    run_cli("convert_hf_to_megatron", main)
