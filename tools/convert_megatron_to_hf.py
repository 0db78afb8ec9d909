"""Megatron distributed checkpoint (from tools/convert_hf_to_megatron.py or training) -> HF safetensors.

    python tools/convert_megatron_to_hf.py --load ckpt/q15 --hf-template Qwen2.5-1.5B --save out/q15-hf
    python tools/convert_megatron_to_hf.py --load outputs/run/ckpt --hf-template Qwen2.5-1.5B --save out/step-hf
    torchrun --nproc_per_node=2 tools/convert_megatron_to_hf.py ... --tensor-model-parallel-size 2

`--load` takes a model-only checkpoint (tools/convert_hf_to_megatron.py), an `rlad-train --save` dir (the
checkpoint `latest` names; without `latest`, the newest complete `iter_*`, as `--load` resumes) or one of
its `iter_*` dirs. Any world size works (TP*PP must divide it; default TP=PP=1); the checkpoint is resharded
on load. The template supplies config.json, generation_config.json and tokenizer files and must describe the
same model; a template without tokenizer files is refused unless `--tokenizer DIR` supplies them. Output is
sharded safetensors + `model.safetensors.index.json`, written atomically: nothing is left at --save on error.
Bad input is one line on stderr and exit code 2, before anything is built. `--backend bridge` delegates to
Megatron-Bridge's `export_ckpt` (CUDA + Transformer Engine only).
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--load", required=True,
                   help="model-only Megatron checkpoint, rlad-train --save dir, or one of its iter_* dirs")
    p.add_argument("--hf-template", required=True, help="HF dir providing config/tokenizer files")
    p.add_argument("--tokenizer", default=None, help="copy the tokenizer files from this dir (default: the template's)")
    p.add_argument("--save", required=True, help="output HF dir (must not exist)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save dir")
    p.add_argument("--backend", choices=["native", "bridge"], default="native")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace):
    """Every check that needs no process group (UserError naming the flag): the checkpoint's files, the template
    (same model, tokenizer files), heads/layers vs TP/PP, the world size, the output path. Returns the source."""
    from rlad_megatron.convert.hf_to_megatron import check_same_model
    from rlad_megatron.errors import OutputExistsError, UserError, as_user_error
    from rlad_megatron.model_source import inspect_megatron
    from rlad_megatron.models.families import spec_from_hf_config
    from rlad_megatron.preflight import check_model_layout, world_size
    from rlad_megatron.tokenizer import TOKENIZER_MARKERS, has_tokenizer_files, load_tokenizer

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    source = inspect_megatron(args.load, flag="--load")
    spec = spec_from_hf_config(source.hf_config)
    with as_user_error(flag="--hf-template"):
        check_same_model(spec, spec_from_hf_config(args.hf_template), f"{Path(args.hf_template) / 'config.json'}")
    if args.tokenizer:
        load_tokenizer(args.tokenizer, flag="--tokenizer")
    elif not has_tokenizer_files(args.hf_template):
        raise UserError(f"--hf-template {args.hf_template}: no tokenizer files ({' / '.join(TOKENIZER_MARKERS)}), so "
                        "the export would not load with AutoTokenizer; pass --tokenizer DIR to copy them from there")
    check_model_layout("model", spec, tp, pp, tp_flag="--tensor-model-parallel-size",
                       pp_flag="--pipeline-model-parallel-size")
    if source.padded_vocab % tp:
        raise UserError(f"--tensor-model-parallel-size {tp}: the checkpoint's padded vocab {source.padded_vocab} is not "
                        "divisible by it")
    if world_size() % (tp * pp):
        raise UserError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not divide the "
                        f"world size {world_size()}")
    if Path(args.save).exists() and not args.overwrite:
        raise OutputExistsError(f"--save {args.save}: already exists (pass --overwrite to replace it)")
    return source


def convert_native(args: argparse.Namespace) -> None:
    from rlad_megatron import platform
    from rlad_megatron.convert import save_hf_checkpoint
    from rlad_megatron.model_source import build_megatron

    source = check_inputs(args)  # before any process group: bad input fails fast, on every rank alike
    platform.init(platform.Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size))
    if platform.is_rank0():
        print(f"reading {source.note}", flush=True)
    model = build_megatron(source)
    save_hf_checkpoint(model, args.hf_template, args.save, args.max_shard_size, overwrite=args.overwrite,
                       tokenizer_dir=args.tokenizer)
    if platform.is_rank0():
        print(f"wrote {args.save}")


def convert_bridge(args: argparse.Namespace) -> None:
    try:
        from megatron.bridge import AutoBridge
    except ImportError as e:
        from rlad_megatron.errors import UserError

        raise UserError(
            "--backend bridge needs Megatron-Bridge (`pip install megatron-bridge`, CUDA + Transformer Engine); "
            f"it is not importable here ({e}). Use the default --backend native."
        ) from e
    AutoBridge.from_hf_pretrained(args.hf_template).export_ckpt(args.load, args.save)


def main(argv: list[str] | None = None) -> None:
    """Convert; raises on bad input (in-process use). The command line wraps it (`errors.run_cli`)."""
    args = parse_args(argv)
    {"native": convert_native, "bridge": convert_bridge}[args.backend](args)


if __name__ == "__main__":
    from rlad_megatron.errors import run_cli

    run_cli("convert_megatron_to_hf", main)
