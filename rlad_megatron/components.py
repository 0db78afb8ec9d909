"""Build what the loop needs from the flags: tokenizer, student (+ optimizer), teacher, rollout
engine, prompt streams, reward. Nothing here runs a step."""

from __future__ import annotations

import random
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlad_megatron import platform
from rlad_megatron.algos import NEEDS_TEACHER
from rlad_megatron.arguments import transformer_config_overrides
from rlad_megatron.data.prompts import PromptSample, encode_samples, load_prompt_file
from rlad_megatron.fp8 import ddp_overrides
from rlad_megatron.models import spec_from_hf_config
from rlad_megatron.models.builder import Model, build_model
from rlad_megatron.models.teacher import build_teacher
from rlad_megatron.tokenizer import check_same_tokenizer, load_tokenizer


class PromptStream:
    """Endless, seeded, epoch-shuffled prompts; `position` (prompts consumed) is the resume state."""

    def __init__(self, samples: list[PromptSample], seed: int, position: int = 0) -> None:
        if not samples:
            raise ValueError("the prompt set is empty")
        self.samples, self.seed, self.position = samples, seed, position
        self._epoch, self._cached_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation (a pure function of seed and epoch; computed once per epoch)."""
        if epoch != self._epoch:
            self._cached_order = list(range(len(self.samples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._cached_order)
            self._epoch = epoch
        return self._cached_order

    def next_batch(self, n: int) -> list[PromptSample]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.samples))
            out.append(self.samples[self._order(epoch)[i]])
            self.position += 1
        return out


def load_prompts(source: str, *, split: str, size: int, seed: int, tokenizer, apply_chat_template: bool):
    """`builtin:<task>` (seeded generator; eval split uses seeds disjoint from train) or a JSONL/Parquet file."""
    if source.startswith("builtin:"):
        task = source.split(":", 1)[1]
        if task == "addition":
            from rlad_megatron.data.addition import make_addition_dataset

            samples = make_addition_dataset(split, size, seed)
        else:
            from rlad_megatron.data.tasks import make_task_dataset

            samples = make_task_dataset(task, split=split, size=size, seed=seed, chat=apply_chat_template)
    else:
        samples = load_prompt_file(source)
    return encode_samples(samples, tokenizer, apply_chat_template)


def _dtype(args: Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float32


def _use_te(args: Namespace) -> bool | None:
    return {"auto": None, "local": False, "transformer_engine": True}[args.transformer_impl]


def _model_dir_spec(hf_dir: str | None, load_dir: str | None):
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


def build_student(args: Namespace, spec) -> Model:
    from rlad_megatron.fp8 import validate_fp8

    overrides = {**transformer_config_overrides(args), **validate_fp8(args)}
    student = build_model(spec, params_dtype=_dtype(args), make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                          padded_vocab=_padded_vocab(args.student_load, args.tensor_model_parallel_size),
                          use_te=_use_te(args), **overrides)
    _load_weights(student, args.student_hf, args.student_load)
    return student


def build_frozen_model(args: Namespace, hf_dir: str | None, load_dir: str | None, *, tp: int, pp: int) -> Model:
    """A frozen model on its own process groups (teacher, or the reference copy of the initial student)."""
    model = build_teacher(_model_dir_spec(hf_dir, load_dir), tp=tp, pp=pp, params_dtype=_dtype(args),
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


def _load_weights(model: Model, hf_dir: str | None, load_dir: str | None) -> None:
    from rlad_megatron.convert import load_hf_into_megatron, load_megatron_checkpoint

    if load_dir:
        load_megatron_checkpoint(model, load_dir)
    else:
        load_hf_into_megatron(model, hf_dir)


def build_engine(args: Namespace, spec, tokenizer, model_dir: str | None = None):
    """The rollout engine, on rank 0 only (its rollouts are broadcast). It starts with dummy weights and
    receives the real ones through the weight-sync path, as SGLang does."""
    if not platform.is_rank0():
        return None
    if args.rollout_engine == "hf":
        from transformers import AutoConfig

        from rlad_megatron.rollout.hf_engine import HFEngine

        config = AutoConfig.for_model(**{k: v for k, v in spec.hf_config.items() if k != "transformers_version"})
        return HFEngine(config, dtype=_dtype(args), device=platform.device(), seed=args.seed, tokenizer=tokenizer)
    from rlad_megatron.rollout.sglang_engine import make_sglang_engine

    return make_sglang_engine(args, model_dir=model_dir or args.student_hf or args.tokenizer)


@dataclass
class Components:
    args: Namespace
    tokenizer: object
    student: Model
    ddp: object
    optimizer: object
    scheduler: object
    teacher: Model | None
    reference: Model | None  # frozen initial student for --ref-kl-coef (beta * KL(student || reference))
    engine: object
    train_prompts: PromptStream
    eval_prompts: list[PromptSample]
    reward: str
    offloader: object = None  # colocated SGLang on GPU: moves student/optimizer/teacher out while it generates
    extra: dict = field(default_factory=dict)


def build_components(args: Namespace) -> Components:
    from rlad_megatron.optim import build_optimizer

    tok_dir = args.tokenizer or args.student_hf
    if tok_dir is None:
        raise ValueError("--tokenizer is required with --student-load (no HF dir to read it from)")
    tokenizer = load_tokenizer(tok_dir)
    needs_teacher = args.algo in NEEDS_TEACHER or (args.algo == "sft" and args.sft_source == "teacher")
    if needs_teacher and args.teacher_hf:
        check_same_tokenizer(tokenizer, load_tokenizer(args.teacher_hf), teacher_name=f"teacher ({args.teacher_hf})")

    spec = _model_dir_spec(args.student_hf, args.student_load)
    student = build_student(args, spec)
    total_updates = args.train_iters * args.num_updates_per_rollout
    ddp, optimizer, scheduler = build_optimizer(
        student, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad, bf16=args.bf16,
        use_distributed_optimizer=args.use_distributed_optimizer, lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=max(total_updates, 1), lr_decay_style=args.lr_decay_style, ddp_overrides=ddp_overrides(args))
    teacher = build_teacher_model(args) if needs_teacher else None
    reference = build_reference_model(args) if args.ref_kl_coef > 0 else None

    train = load_prompts(args.prompt_data, split="train", size=args.train_size, seed=args.seed, tokenizer=tokenizer,
                         apply_chat_template=args.apply_chat_template)
    evals = []
    if args.eval_data:
        evals = load_prompts(args.eval_data, split="eval", size=args.eval_size, seed=args.eval_seed, tokenizer=tokenizer,
                             apply_chat_template=args.apply_chat_template)[: args.eval_size]
    reward = args.reward or train[0].task
    if not reward:
        raise ValueError(f"{args.prompt_data}: rows carry no 'task' name; pass --reward")
    engine = build_engine(args, spec, tokenizer)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return Components(args=args, tokenizer=tokenizer, student=student, ddp=ddp, optimizer=optimizer,
                      scheduler=scheduler, teacher=teacher, reference=reference, engine=engine, train_prompts=PromptStream(train, args.seed),
                      eval_prompts=evals, reward=reward, offloader=build_offloader(args, ddp, optimizer, teacher))


def build_offloader(args: Namespace, ddp, optimizer, teacher: Model | None):
    """Colocated SGLang shares the GPUs with training: the optimizer state, the student and the teacher are
    registered so they can leave GPU memory while the engine generates (torch_memory_saver or CPU copies)."""
    if args.rollout_engine != "sglang" or not platform.has_cuda():
        return None
    from rlad_megatron.offload import Offloader

    off = Offloader()
    off.register("optimizer", optimizer)
    off.register("student", ddp)
    if teacher is not None:
        off.register("teacher", teacher.module, frozen=True)
    return off

def pad_id(c: Components) -> int:
    tok = c.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
