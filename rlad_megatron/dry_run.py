"""`--dry-run`: check every flag and input that can be checked without building models, then exit.

Works on a CPU box for a multi-node GPU command line: the world size comes from torchrun's
environment (WORLD_SIZE) or NNODES x GPUS_PER_NODE; HF dirs that exist are parsed and checked
against the parallel layout, missing ones are reported (they are on the cluster's filesystem).
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from rlad_megatron.step.build import transformer_config_overrides


def _world_size() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("NNODES", "1")) * int(os.environ.get("GPUS_PER_NODE", "1"))


def _check_model(name: str, hf_dir: str | None, tp: int, pp: int, notes: list[str]) -> None:
    from rlad_megatron.models import spec_from_hf_config

    if not hf_dir:
        return
    if not Path(hf_dir).exists():
        notes.append(f"{name}: {hf_dir} not found here (checked at start-up on the cluster)")
        return
    spec = spec_from_hf_config(hf_dir)
    for field, n in (("num_attention_heads", spec.num_attention_heads), ("num_key_value_heads", spec.num_query_groups)):
        if n % tp:
            raise ValueError(f"{name}: {field}={n} is not divisible by TP={tp}")
    if spec.num_layers % pp:
        raise ValueError(f"{name}: num_hidden_layers={spec.num_layers} is not divisible by PP={pp}")
    notes.append(f"{name}: {spec.architecture} {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}")


def dry_run(args: Namespace) -> None:
    from megatron.core.transformer import TransformerConfig

    from rlad_megatron.fp8 import GpuFacts, validate_fp8

    notes: list[str] = []
    world = _world_size()
    s_mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    t_mp = args.teacher_tensor_model_parallel_size * args.teacher_pipeline_model_parallel_size
    for who, mp in (("student TP*PP*CP", s_mp), ("teacher TP*PP", t_mp)):
        if world % mp:
            raise ValueError(f"{who} = {mp} does not divide the world size {world}")
    dp = world // s_mp
    n = args.rollout_batch_size * args.n_samples_per_prompt
    per_update = n // args.num_updates_per_rollout
    if per_update % (dp * args.micro_batch_size):
        raise ValueError(f"global batch {per_update} is not divisible by DP ({dp}) x --micro-batch-size "
                         f"({args.micro_batch_size})")
    fields = {f.name for f in __import__("dataclasses").fields(TransformerConfig)}
    unknown = sorted(set(transformer_config_overrides(args)) - fields)
    if unknown:
        raise ValueError(f"unknown TransformerConfig fields: {unknown}")
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
