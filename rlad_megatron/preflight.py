"""`rlad-train` input checks from files and flags alone, before `torch.distributed` starts or any model is built.

`check_train_inputs(args)` raises a `UserError` naming the flag (and file) for: prompt/eval sources (the file
exists and its first `PEEK_ROWS` rows parse; a builtin task name exists), the reward name (default: the
prompts' task), tokenizers (they load; student and teacher agree token for token), model configs and
Megatron checkpoints (`--student-load`/`--teacher-load` complete, `--load` resolvable), and layouts: TP*PP*CP
of the student and TP*PP of the teacher divide the world size (torchrun's WORLD_SIZE), heads, KV heads and
layers divide TP/PP. It returns notes for rank 0 to print (e.g. which checkpoint `--load` resumes from).
The layout checks are shared with `--dry-run` (`dry_run.py`), which reports missing paths instead of failing.
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from rlad_megatron.errors import UserError, as_user_error
from rlad_megatron.step.algos import ALGOS

PEEK_ROWS = 64


def world_size() -> int:
    """torchrun's WORLD_SIZE, else NNODES x GPUS_PER_NODE (a cluster command line checked elsewhere), else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("NNODES", "1")) * int(os.environ.get("GPUS_PER_NODE", "1"))


def needs_teacher(args: Namespace) -> bool:
    return ALGOS[args.algo].needs_teacher(args.sft_source)


def check_layout(args: Namespace, world: int) -> int:
    """Student TP*PP*CP and teacher TP*PP divide `world`; each update's batch splits over DP ranks into micro-batches
    (the rule of `step.update.micro_batches`). Returns DP."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    t_tp, t_pp = args.teacher_tensor_model_parallel_size or tp, args.teacher_pipeline_model_parallel_size
    if world % (tp * pp * cp):
        raise UserError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} x "
                        f"--context-parallel-size {cp} = {tp * pp * cp} (student TP*PP*CP) does not divide the world "
                        f"size {world} (processes started by torchrun)")
    if world % (t_tp * t_pp):
        raise UserError(f"--teacher-tensor-model-parallel-size {t_tp} x --teacher-pipeline-model-parallel-size {t_pp} "
                        f"= {t_tp * t_pp} (teacher TP*PP) does not divide the world size {world} (processes started "
                        "by torchrun)")
    dp = world // (tp * pp * cp)
    engines = args.rollout_num_gpus_per_engine
    if world % engines:
        raise UserError(f"--rollout-num-gpus-per-engine {engines} does not divide the world size {world} (each "
                        "colocated engine spans that many ranks)")
    per_update = args.rollout_batch_size * args.n_samples_per_prompt // args.num_updates_per_rollout
    if args.use_dynamic_batch_size:  # packs: any split over the DP ranks, but every rank needs a sequence
        if per_update < dp:
            raise UserError(f"--use-dynamic-batch-size: {per_update} sequences per update are fewer than the "
                            f"data-parallel size {dp}")
        if args.max_tokens_per_gpu < args.max_response_len:
            raise UserError(f"--max-tokens-per-gpu {args.max_tokens_per_gpu} is below --max-response-len "
                            f"{args.max_response_len}: a full-length response would not fit a pack")
        return dp
    if per_update % dp:
        raise UserError(f"--rollout-batch-size {args.rollout_batch_size} x --n-samples-per-prompt "
                        f"{args.n_samples_per_prompt} / --num-updates-per-rollout {args.num_updates_per_rollout} = "
                        f"{per_update} sequences per update do not split over the data-parallel size {dp}")
    per_rank = per_update // dp
    mbs = min(args.micro_batch_size, per_rank)  # as step.update.micro_batches: a larger micro-batch is clamped
    if per_rank % mbs:
        raise UserError(f"--micro-batch-size {args.micro_batch_size}: {per_rank} sequences per data-parallel rank are "
                        f"not divisible by it")
    return dp


def check_model_layout(who: str, spec, tp: int, pp: int, *, tp_flag: str, pp_flag: str) -> None:
    """Attention heads and KV heads divide TP, layers divide PP (Megatron asserts deep inside otherwise)."""
    for field, n in (("num_attention_heads", spec.num_attention_heads), ("num_key_value_heads", spec.num_query_groups)):
        if n % tp:
            raise UserError(f"{tp_flag} {tp}: the {who}'s {field}={n} is not divisible by it (pick a TP that divides "
                            f"{n})")
    if spec.num_layers % pp:
        raise UserError(f"{pp_flag} {pp}: the {who}'s num_hidden_layers={spec.num_layers} is not divisible by it")


def model_spec(who: str, hf_dir: str | None, load_dir: str | None, tp: int):
    """The ModelSpec of `--{who}-hf` or `--{who}-load` (a complete model-only checkpoint whose padded vocab splits
    over `tp`)."""
    from rlad_megatron.models.families import spec_from_hf_config

    if hf_dir:
        from rlad_megatron.convert.hf_to_megatron import SafetensorsCheckpoint, check_hf_checkpoint

        with as_user_error(flag=f"--{who}-hf"):
            spec = spec_from_hf_config(hf_dir)
            with SafetensorsCheckpoint(hf_dir) as ckpt:  # headers only: names, shapes, truncation
                check_hf_checkpoint(ckpt, spec)
            return spec
    from rlad_megatron.convert.dist_checkpoint import check_model_checkpoint, padded_vocab_for

    with as_user_error(flag=f"--{who}-load"):
        if not Path(load_dir).is_dir():
            raise UserError(f"{load_dir}: no such directory (expected tools/convert_hf_to_megatron.py output)")
        meta = check_model_checkpoint(load_dir)
        padded_vocab_for(meta, tp)
        return spec_from_hf_config(meta.hf_config)


def check_prompt_source(flag: str, source: str, configs: list[dict] | None = None) -> str:
    """A builtin task exists and builds an item under every `--task-config` / the file's first rows parse. Returns
    the rows' task name ("" if none)."""
    from rlad_megatron.data.prompts import load_prompt_file

    if source.startswith("builtin:"):
        from rlad_megatron.data.generators import check_task_name
        from rlad_megatron.data.tasks import make_task_dataset

        task = source.split(":", 1)[1]
        with as_user_error(flag=f"{flag} {source}:"):
            check_task_name(task)
        for cfg in configs or [{}]:
            with as_user_error(TypeError, flag=f"--task-config {cfg} for {flag} {source}:"):
                make_task_dataset(task, size=1, seed=0, **cfg)  # unknown or invalid generator knobs fail here
        return task
    with as_user_error(flag=flag):
        return load_prompt_file(source, max_rows=PEEK_ROWS)[0].task


def check_train_inputs(args: Namespace) -> list[str]:
    """Validate every input of `rlad-train` that can be checked from files and flags (see the module doc).
    Raises UserError; returns notes to print once."""
    from rlad_megatron.rewards import get_reward_fn
    from rlad_megatron.tokenizer import check_same_tokenizer, load_tokenizer

    notes: list[str] = []
    if args.reward_timeout < 0:
        raise UserError(f"--reward-timeout {args.reward_timeout}: must be >= 0 seconds (0 = no limit)")
    if args.reward_workers < 0:
        raise UserError(f"--reward-workers {args.reward_workers}: must be >= 0 (0 = score in this process)")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    t_tp, t_pp = args.teacher_tensor_model_parallel_size or tp, args.teacher_pipeline_model_parallel_size
    check_layout(args, world_size())

    spec = model_spec("student", args.student_hf, args.student_load, tp)
    check_model_layout("student", spec, tp, pp, tp_flag="--tensor-model-parallel-size",
                       pp_flag="--pipeline-model-parallel-size")
    if not (args.tokenizer or args.student_hf):
        raise UserError("--tokenizer: required with --student-load (a Megatron checkpoint has no tokenizer files)")
    tokenizer = load_tokenizer(args.tokenizer or args.student_hf,
                               flag="--tokenizer" if args.tokenizer else "--student-hf")
    if len(tokenizer) > spec.vocab_size:
        raise UserError(f"--tokenizer {args.tokenizer or args.student_hf}: {len(tokenizer)} tokens but the student's "
                        f"vocab_size is {spec.vocab_size}; use the student's own tokenizer")
    if needs_teacher(args):
        t_spec = model_spec("teacher", args.teacher_hf, args.teacher_load, t_tp)
        check_model_layout("teacher", t_spec, t_tp, t_pp, tp_flag="--teacher-tensor-model-parallel-size",
                           pp_flag="--teacher-pipeline-model-parallel-size")
        if args.teacher_hf:
            teacher_tok = load_tokenizer(args.teacher_hf, flag="--teacher-hf")
            with as_user_error(flag=f"--teacher-hf {args.teacher_hf}:"):
                check_same_tokenizer(tokenizer, teacher_tok, teacher_name="teacher")

    from rlad_megatron.data.loader import is_builtin, parse_task_config

    configs = parse_task_config(args.task_config)
    if args.task_config and not any(is_builtin(s) for s in (args.prompt_data, args.eval_data) if s):
        raise UserError(f"--task-config {' '.join(args.task_config)}: applies to builtin:<task> sets; --prompt-data "
                        "and --eval-data are files")
    task = check_prompt_source("--prompt-data", args.prompt_data, configs)
    if args.eval_data:
        check_prompt_source("--eval-data", args.eval_data, configs)
    reward = args.reward or task
    if not reward:
        raise UserError(f"--prompt-data {args.prompt_data}: rows carry no 'task' name; pass --reward")
    with as_user_error(flag=f"--reward {reward}:" if args.reward else f"--prompt-data {args.prompt_data}: task {reward!r}:"):
        get_reward_fn(reward, format_reward=args.format_reward)

    if args.load:
        from rlad_megatron.checkpoint_dirs import resolve_resume

        with as_user_error(flag="--load"):
            _, note = resolve_resume(args.load)
        notes.append(note)
    return notes
