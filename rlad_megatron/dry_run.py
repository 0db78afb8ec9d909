"""`--dry-run`: check every flag and input that can be checked without building models, then exit.

Works on a CPU box for a multi-node GPU command line: the world size comes from torchrun's
environment (WORLD_SIZE) or NNODES x GPUS_PER_NODE; HF dirs that exist are parsed and checked
against the parallel layout, missing ones are reported (they are on the cluster's filesystem). The layout
checks are `preflight`'s, which a real run applies to every input before building models.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from rlad_megatron.errors import UserError
from rlad_megatron.preflight import check_layout, check_model_layout, world_size
from rlad_megatron.step.build import transformer_config_overrides


def _check_model(name: str, hf_dir: str | None, tp: int, pp: int, notes: list[str]) -> None:
    from rlad_megatron.models import spec_from_hf_config

    if not hf_dir:
        return
    if not Path(hf_dir).exists():
        notes.append(f"{name}: {hf_dir} not found here (checked at start-up on the cluster)")
        return
    spec = spec_from_hf_config(hf_dir)
    prefix = "" if name == "student" else "teacher-"
    check_model_layout(name, spec, tp, pp, tp_flag=f"--{prefix}tensor-model-parallel-size",
                       pp_flag=f"--{prefix}pipeline-model-parallel-size")
    notes.append(f"{name}: {spec.architecture} {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}")


def dry_run(args: Namespace) -> None:
    from megatron.core.transformer import TransformerConfig

    from rlad_megatron.fp8 import GpuFacts, validate_fp8

    notes: list[str] = []
    world = world_size()
    dp = check_layout(args, world)
    n = args.rollout_batch_size * args.n_samples_per_prompt
    per_update = n // args.num_updates_per_rollout
    if args.use_dynamic_batch_size:
        notes.append(f"micro-batches: packs of <= {args.max_tokens_per_gpu} tokens, balanced over {dp} DP ranks")
    fields = {f.name for f in __import__("dataclasses").fields(TransformerConfig)}
    unknown = sorted(set(transformer_config_overrides(args)) - fields)
    if unknown:
        raise UserError(f"unknown TransformerConfig fields: {unknown}")
    # FP8 flags are checked against the cluster's GPUs (Hopper, TE, CUDA 12.9), not this machine's
    hopper = GpuFacts(cuda=True, capability=(9, 0), cuda_version=(12, 9), te=True, name="target Hopper GPU")
    if validate_fp8(args, hopper):
        notes.append("FP8: flags valid for a Hopper GPU with Transformer Engine and CUDA >= 12.9")
    _check_model("student", args.student_hf, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, notes)
    _check_model("teacher", args.teacher_hf, args.teacher_tensor_model_parallel_size,
                 args.teacher_pipeline_model_parallel_size, notes)
    for flag in ("prompt_data", "eval_data"):
        src = getattr(args, flag)
        if src and not src.startswith("builtin:") and not Path(src).exists():
            notes.append(f"--{flag.replace('_', '-')}: {src} not found here (checked at start-up)")
    from rlad_megatron.rollout.layout import EngineLayout

    engines = EngineLayout(world, args.rollout_num_gpus_per_engine)
    notes.append(f"rollout: {engines.describe()}" if args.rollout_engine != "sglang-remote" else
                 f"rollout: remote SGLang servers ({args.sglang_router_url or 'no router'}; "
                 f"{len(args.sglang_server_url)} server URL(s)); every rank a client, rank 0 pushes the weights")
    print(f"dry run OK: algo={args.algo} world={world} student TP={args.tensor_model_parallel_size} "
          f"PP={args.pipeline_model_parallel_size} CP={args.context_parallel_size} DP={dp}; teacher "
          f"TP={args.teacher_tensor_model_parallel_size} PP={args.teacher_pipeline_model_parallel_size}; "
          f"{n} sequences/step in {args.num_updates_per_rollout} update(s) of {per_update}")
    for line in notes:
        print("  " + line)
