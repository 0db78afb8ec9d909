"""Build what a run needs from the flags: the student with its optimizer, the frozen teacher and reference, the
rollout engine, the GPU offloader. Nothing here runs a step; `step.run.build_run` assembles the pieces."""

from __future__ import annotations

import importlib
from argparse import Namespace

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.fp8 import ddp_overrides, validate_fp8
from rlad_megatron.models import spec_from_hf_config
from rlad_megatron.models.builder import Model, build_model
from rlad_megatron.models.families import ModelSpec
from rlad_megatron.models.teacher import build_teacher
from rlad_megatron.rollout.layout import EngineLayout
from rlad_megatron.step.update import Policy

TC_PREFIX = "tc__"  # argparse dest prefix of the TransformerConfig pass-through flags (arguments.py)


def transformer_config_overrides(args: Namespace) -> dict:
    """`--field-name VALUE` pass-through flags -> `{field_name: value}` for megatron-core's TransformerConfig."""
    return {k[len(TC_PREFIX):]: v for k, v in vars(args).items() if k.startswith(TC_PREFIX)}


def params_dtype(args: Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float32


def _use_te(args: Namespace) -> bool | None:
    return {"auto": None, "local": False, "transformer_engine": True}[args.transformer_impl]


def model_spec(hf_dir: str | None, load_dir: str | None) -> ModelSpec:
    """The HF config comes from the HF dir, or from the Megatron checkpoint's meta."""
    if hf_dir:
        return spec_from_hf_config(hf_dir)
    from rlad_megatron.convert import read_checkpoint_meta

    return spec_from_hf_config(read_checkpoint_meta(load_dir)["hf_config"])


def _padded_vocab(load_dir: str | None, tp: int) -> int | None:
    """A Megatron checkpoint keeps its padded vocab (when the new TP divides it)."""
    if not load_dir:
        return None
    from rlad_megatron.convert import padded_vocab_for, read_megatron_meta

    return padded_vocab_for(read_megatron_meta(load_dir), tp)


def _load_weights(model: Model, hf_dir: str | None, load_dir: str | None) -> None:
    from rlad_megatron.convert import load_hf_into_megatron, load_megatron_checkpoint

    if load_dir:
        load_megatron_checkpoint(model, load_dir)
    else:
        load_hf_into_megatron(model, hf_dir)


def build_policy(args: Namespace, spec: ModelSpec) -> Policy:
    """The student on Megatron's global groups, loaded, wrapped in DDP with its optimizer and LR schedule."""
    from rlad_megatron.optim import build_optimizer

    overrides = {**transformer_config_overrides(args), **validate_fp8(args)}
    student = build_model(spec, params_dtype=params_dtype(args), make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          padded_vocab=_padded_vocab(args.student_load, args.tensor_model_parallel_size),
                          use_te=_use_te(args), **overrides)
    _load_weights(student, args.student_hf, args.student_load)
    total_updates = args.train_iters * args.num_updates_per_rollout
    ddp, optimizer, scheduler = build_optimizer(
        student, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad, bf16=args.bf16,
        use_distributed_optimizer=args.use_distributed_optimizer, lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=max(total_updates, 1), lr_decay_style=args.lr_decay_style, ddp_overrides=ddp_overrides(args))
    return Policy(model=student, ddp=ddp, optimizer=optimizer, scheduler=scheduler)


def build_frozen_model(args: Namespace, hf_dir: str | None, load_dir: str | None, *, tp: int, pp: int) -> Model:
    """A frozen model on its own process groups (teacher, or the reference copy of the initial student)."""
    model = build_teacher(model_spec(hf_dir, load_dir), tp=tp, pp=pp, params_dtype=params_dtype(args),
                          make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          padded_vocab=_padded_vocab(load_dir, tp), use_te=_use_te(args))
    _load_weights(model, hf_dir, load_dir)
    return model


def build_teacher_model(args: Namespace) -> Model:
    return build_frozen_model(args, args.teacher_hf, args.teacher_load, tp=args.teacher_tensor_model_parallel_size,
                              pp=args.teacher_pipeline_model_parallel_size)


def build_reference_model(args: Namespace) -> Model:
    """The initial student, frozen, with the student's layout: the `pi_ref` of `beta * KL(pi || pi_ref)`. Loaded
    from --student-hf / --student-load, so a resumed run keeps the same one."""
    return build_frozen_model(args, args.student_hf, args.student_load, tp=args.tensor_model_parallel_size,
                              pp=args.pipeline_model_parallel_size)


_ENGINE_RANKS: dict = {}


def engine_ranks(args: Namespace, layout: EngineLayout):
    """The gloo group of this rank's colocated SGLang engine when it spans several ranks (TP > 1), else None.
    Built once per layout (collectively, on first use by every rank)."""
    if args.rollout_engine != "sglang" or layout.gpus_per_engine == 1 or not dist.is_initialized():
        return None
    key = (layout.world, layout.gpus_per_engine)
    if key not in _ENGINE_RANKS:
        from rlad_megatron.rollout.sglang.engine_ranks import build_engine_ranks

        _ENGINE_RANKS[key] = build_engine_ranks(layout, dist.get_rank())
    return _ENGINE_RANKS[key]


def build_weight_peer(args: Namespace, layout: EngineLayout):
    """On a non-leader rank of a TP > 1 colocated SGLang engine: what it pushes its weights into (each engine TP
    rank loads from the training rank on its GPU); None elsewhere."""
    ranks = engine_ranks(args, layout)
    if ranks is None:
        return None
    from rlad_megatron.rollout.sglang.factory import make_weight_peer

    return make_weight_peer(ranks)


def build_engine(args: Namespace, spec: ModelSpec, layout: EngineLayout, model_dir: str | None = None, *, tokenizer):
    """This rank's rollout engine: one per `--rollout-num-gpus-per-engine` ranks, on the group's first rank (None on
    the others); with remote SGLang servers every rank is a client (rank 0's pushes the weights). It starts with
    dummy weights and receives the real ones through the weight-sync path, as SGLang does. `--rollout-engine
    module.path:factory` builds a custom engine with `factory(args, spec, tokenizer)`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    ranks = engine_ranks(args, layout)  # collective on first use: before any rank returns
    if args.rollout_engine == "sglang-remote":
        from rlad_megatron.rollout.sglang.factory import make_sglang_engine

        return make_sglang_engine(args, model_dir=model_dir or args.student_hf or args.tokenizer, rank=rank)
    if not layout.is_leader(rank):
        if ranks is not None:  # the leader's engine sizes its KV pool on this rank's GPU too: let it start first
            dist.barrier(group=ranks.group)
        return None
    if args.rollout_engine == "hf":
        from transformers import AutoConfig

        from rlad_megatron.rollout.hf_engine import HFEngine

        config = AutoConfig.for_model(**{k: v for k, v in spec.hf_config.items() if k != "transformers_version"})
        return HFEngine(config, dtype=params_dtype(args), device=platform.device(), seed=args.seed,
                        tokenizer=tokenizer)
    if ":" in args.rollout_engine:
        module, _, name = args.rollout_engine.partition(":")
        return getattr(importlib.import_module(module), name)(args, spec, tokenizer)
    from rlad_megatron.rollout.sglang.factory import make_sglang_engine

    engine = make_sglang_engine(args, model_dir=model_dir or args.student_hf or args.tokenizer, rank=rank,
                                tp_size=layout.gpus_per_engine, ranks=ranks)
    if ranks is not None:
        dist.barrier(group=ranks.group)
    return engine


def build_offloader(args: Namespace, policy: Policy, teacher: Model | None):
    """Colocated SGLang shares the GPUs with training: the optimizer state, the student and the teacher are
    registered so they can leave GPU memory while the engine generates (torch_memory_saver or CPU copies)."""
    if args.rollout_engine != "sglang" or not platform.has_cuda():
        return None
    from rlad_megatron.offload import Offloader

    off = Offloader()
    off.register("optimizer", policy.optimizer)
    off.register("student", policy.ddp)
    if teacher is not None:
        off.register("teacher", teacher.module, frozen=True)
    return off
