"""The run: everything the loop's steps share, in one typed object, built once from the flags (`build_run`), and
the checkpoint state that makes a resumed run continue an interrupted one exactly (`save_run`, `resume_run`)."""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.data import PromptSample, PromptStream, load_prompts
from rlad_megatron.data.loader import is_builtin, overlap, parse_task_config
from rlad_megatron.models.builder import Model
from rlad_megatron.models.families import ModelSpec
from rlad_megatron.offload import ALL_ENGINE_TAGS
from rlad_megatron.rollout.base import Rollout, RolloutEngine
from rlad_megatron.rollout.dispatch import Scorer
from rlad_megatron.rollout.generate import RewardSpec, make_scorer
from rlad_megatron.rollout.layout import EngineLayout
from rlad_megatron.step.algos import ALGOS, Algo, LossConfig
from rlad_megatron.step.build import (
    build_engine,
    build_offloader,
    build_policy,
    build_reference_model,
    build_teacher_model,
    build_weight_peer,
    model_spec,
)
from rlad_megatron.step.configs import LoopConfig, RolloutConfig, SyncConfig
from rlad_megatron.step.update import Policy, UpdateConfig
from rlad_megatron.tokenizer import check_same_tokenizer, load_tokenizer


@dataclass
class RunState:
    """What a checkpoint restores besides model, optimizer and scheduler."""

    step: int = 0  # RL steps done
    sft_position: int = 0  # SFT traces consumed


@dataclass
class Run:
    loop: LoopConfig
    algo: Algo
    loss: LossConfig
    update: UpdateConfig
    rollout: RolloutConfig
    sync: SyncConfig
    tokenizer: object
    policy: Policy
    teacher: Model | None
    reference: Model | None  # frozen initial student for --ref-kl-coef (beta * KL(student || reference))
    engine: RolloutEngine | None  # this rank's engine: on every engine leader rank (`layout`), None elsewhere;
    # remote SGLang: a client on every rank (rank 0's also pushes the weights)
    train_prompts: PromptStream
    eval_prompts: list[PromptSample]
    reward: RewardSpec
    scorer: Scorer  # training reward, per-sample futures
    eval_scorer: Scorer  # the same reward without the format bonus (Mean@k averages the scores)
    layout: EngineLayout
    offloader: object = None  # colocated SGLang on GPU: moves student/optimizer/teacher out while it generates
    weight_peer: object = None  # non-leader rank of a TP > 1 colocated SGLang engine: pushes its own payloads
    state: RunState = field(default_factory=RunState)
    engine_holds: str | None = None  # label of the weights the engine holds now; None: none (dummy or released)
    sft_traces: list[Rollout] = field(default_factory=list)
    engine_factory: Callable[[ModelSpec, str | None], RolloutEngine | None] | None = None  # (spec, model dir)
    teacher_dir: str | None = None  # --teacher-hf (an SGLang engine for the teacher's traces reads its config)
    data_metrics: dict = field(default_factory=dict)  # data/*: sizes and the MEASURED eval/train prompt overlap

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def build_run(args: Namespace) -> Run:
    """Tokenizers (teacher's checked against the student's), models, optimizer, engine, prompt streams, reward: the
    only place below the trainer that reads the flags; everything after takes the typed configs."""
    algo = ALGOS[args.algo]
    tok_dir = args.tokenizer or args.student_hf
    if tok_dir is None:
        raise ValueError("--tokenizer is required with --student-load (no HF dir to read it from)")
    tokenizer = load_tokenizer(tok_dir)
    needs_teacher = algo.needs_teacher(args.sft_source)
    if needs_teacher and args.teacher_hf:
        check_same_tokenizer(tokenizer, load_tokenizer(args.teacher_hf), teacher_name=f"teacher ({args.teacher_hf})")

    configs = parse_task_config(args.task_config)

    def load(source: str, split: str, size: int, seed: int) -> list[PromptSample]:
        return load_prompts(source, split=split, size=size, seed=seed, tokenizer=tokenizer,
                            apply_chat_template=args.apply_chat_template,
                            configs=configs if is_builtin(source) else [{}])

    train = load(args.prompt_data, "train", args.train_size, args.seed)
    evals = []
    if args.eval_data:
        evals = load(args.eval_data, args.eval_split, args.eval_size, args.eval_seed)
        evals = evals if is_builtin(args.eval_data) else evals[: args.eval_size]
    # measured, not assumed: how many eval prompts are training prompts of this run (0 for builtin sets by
    # construction, `data.partition`; a file pair can share prompts, and the count says so)
    data_metrics = {"data/train_prompts": float(len(train)), "data/eval_prompts": float(len(evals)),
                    "data/eval_train_overlap": float(overlap(evals, train))} if evals else {}
    reward = args.reward or train[0].task
    if not reward:
        raise ValueError(f"{args.prompt_data}: rows carry no 'task' name; pass --reward")

    spec = model_spec(args.student_hf, args.student_load)
    layout = EngineLayout(dist.get_world_size() if dist.is_initialized() else 1, args.rollout_num_gpus_per_engine)
    # colocated engines first: SGLang sizes its KV pool from the memory free at start-up; then they step aside
    engine = build_engine(args, spec, layout, tokenizer=tokenizer)
    weight_peer = build_weight_peer(args, layout)
    if engine is not None and getattr(engine, "mode", "colocated") != "remote":
        engine.release_memory(ALL_ENGINE_TAGS)
    policy = build_policy(args, spec)
    teacher = build_teacher_model(args) if needs_teacher else None
    reference = build_reference_model(args) if args.ref_kl_coef > 0 else None
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    reward_spec = RewardSpec(reward, workers=args.reward_workers, format_reward=args.format_reward,
                             timeout=args.reward_timeout)
    scorer, eval_scorer = make_scorer(reward_spec), make_scorer(replace(reward_spec, format_reward=0.0))
    scorer.wait_ready()  # reward worker processes up before the first sample finishes
    return Run(loop=LoopConfig.from_args(args), algo=algo, loss=LossConfig.from_args(args),
               update=UpdateConfig.from_args(args), rollout=RolloutConfig.from_args(args),
               sync=SyncConfig.from_args(args), tokenizer=tokenizer, policy=policy, teacher=teacher,
               reference=reference, engine=engine, train_prompts=PromptStream(train, args.seed), eval_prompts=evals,
               reward=reward_spec, scorer=scorer, eval_scorer=eval_scorer, layout=layout,
               offloader=build_offloader(args, policy, teacher), weight_peer=weight_peer,
               engine_factory=lambda s, d: build_engine(args, s, layout, d, tokenizer=tokenizer),
               teacher_dir=args.teacher_hf, data_metrics=data_metrics)


# ------------------------------------------------------------------------------------------------ checkpoints


def save_run(run: Run) -> None:
    """An atomic training checkpoint of the run after `run.state.step` steps."""
    from rlad_megatron.checkpoint import save_checkpoint

    p = run.policy
    state = {"step": run.state.step, "prompt_position": run.train_prompts.position,
             "sft_pos": run.state.sft_position}
    save_checkpoint(run.loop.save, run.state.step, p.model, p.optimizer, p.scheduler, state,
                    keep_last=run.loop.keep_last)


def resume_run(run: Run) -> None:
    """Continue from `--load` (model, optimizer, scheduler, RNG, prompt stream, SFT position) when it holds a
    checkpoint: the one `latest` names, else the newest complete `iter_*` (the preflight said which); a first run
    of a resumable job starts at step 0."""
    if not run.loop.load:
        return
    from rlad_megatron.checkpoint import load_checkpoint
    from rlad_megatron.checkpoint_dirs import resolve_resume

    step, _ = resolve_resume(run.loop.load)
    if step is None:
        return
    p = run.policy
    state = load_checkpoint(run.loop.load, p.model, p.optimizer, p.scheduler, step=step)
    if not state:
        return
    run.state = RunState(step=state["step"], sft_position=state.get("sft_pos", 0))
    run.train_prompts.position = state["prompt_position"]


def hf_template(run: Run) -> str:
    """An HF dir for the student's export: --student-hf, or a config.json written from the checkpoint meta next
    to the tokenizer files."""
    if run.loop.hf_template:
        return run.loop.hf_template
    out = Path(run.loop.output_dir) / "hf_template"
    if platform.is_rank0():
        shutil.copytree(run.loop.tokenizer_dir, out, dirs_exist_ok=True)
        (out / "config.json").write_text(json.dumps(run.policy.model.spec.hf_config, indent=2))
    platform.barrier()
    return str(out)


def export_student(run: Run) -> None:
    """`--save-hf`: the student as a Hugging Face dir (config and tokenizer from `hf_template`)."""
    from rlad_megatron.convert import save_hf_checkpoint

    save_hf_checkpoint(run.policy.model, hf_template(run), run.loop.save_hf, overwrite=True)


def open_log(run: Run):
    """The metrics logger. A fresh run starts a new metrics.jsonl; a resumed one keeps the lines up to the resumed
    step, so the file reads as one uninterrupted run."""
    from rlad_megatron.metrics_log import METRICS_FILE, MetricsLogger

    path = Path(run.loop.output_dir) / METRICS_FILE
    start = run.state.step
    if platform.is_rank0() and path.exists():
        keep = [line for line in path.read_text().splitlines()
                if start and line.strip() and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in keep))
    return MetricsLogger(run.loop.output_dir, tensorboard_dir=run.loop.tensorboard_dir,
                         wandb_project=run.loop.wandb_project, total_steps=run.loop.train_iters, start_step=start)
