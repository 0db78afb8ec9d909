"""The RL loop. Each step:

    prompts  = next rollout_batch_size prompts
    rollouts = engine.generate(prompts x n_samples_per_prompt)          (rank 0, broadcast)
    rewards  = reward(rollouts);  A = group-normalised advantages       (+ dynamic sampling)
    old_logp = student forward;   teacher_logp = teacher forward        (vocab-parallel, same temperature)
    update   = num_updates_per_rollout optimizer steps with --algo's loss
    sync     = Megatron -> HF names -> buckets -> engine               (lazily, before the next rollout/eval)
    log / eval / save

Rollout collection lives in `rollout/collect.py`, the engine side (weight push, GPU staging) in
`rollout/phase.py`, the loss per --algo in `algos.py`, the optimizer steps in `update.py`.
"""

from __future__ import annotations

from argparse import Namespace

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.algos import IS_RL, NEEDS_TEACHER_LOGP
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.components import Components, build_components
from rlad_megatron.diagnostics import PhaseTimer, batch_diagnostics, check_finite, teacher_diagnostics
from rlad_megatron.evaluation import evaluate
from rlad_megatron.models.forward import compute_logprobs
from rlad_megatron.rollout.base import SamplingParams
from rlad_megatron.rollout.collect import collect_batch, sft_traces
from rlad_megatron.rollout.phase import rollout_phase
from rlad_megatron.update import update_policy


def train(args: Namespace) -> dict:
    c = build_components(args)
    state = resume(c)
    c.extra["engine_stale"] = True
    if args.algo == "sft":
        c.extra["sft_pool"] = sft_traces(c)
    log = make_logger(c, state["step"])
    metrics: dict = {}
    if state["step"] == 0 and c.eval_prompts:
        before = evaluate_student(c)
        log.log(0, before)
        if platform.is_rank0():
            print("eval before training: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()), flush=True)
    for step in range(state["step"], args.train_iters):
        timer = PhaseTimer()
        with timer("rollout"):
            batch, metrics = collect_batch(c, step)
        metrics |= score_with_models(c, batch, step, timer)
        with timer("update"):
            metrics |= update_policy(c.student, c.ddp, c.optimizer, c.scheduler, batch, args, step=step + 1,
                                     teacher_logits_fn=teacher_logits_fn(c))
        c.extra["engine_stale"] = True  # pushed at the next rollout or eval (SFT: only before evals)
        metrics |= c.extra.pop("sync_metrics", {})
        metrics |= timer.metrics(tokens=float(batch.response_mask.sum()))
        if args.eval_interval and c.eval_prompts and (step + 1) % args.eval_interval == 0:
            metrics |= evaluate_student(c)
        log.log(step + 1, metrics)
        if args.save and args.save_interval and (step + 1) % args.save_interval == 0:
            save(c, step + 1)
    final = metrics if last_step_evaluated(args) else (evaluate_student(c) if c.eval_prompts else {})
    final = {k: v for k, v in final.items() if k.startswith("eval/")}
    if final and not last_step_evaluated(args):
        log.log(args.train_iters, final)
    log.close()
    if args.save_hf:
        from rlad_megatron.convert import save_hf_checkpoint

        save_hf_checkpoint(c.student, hf_template(c), args.save_hf, overwrite=True)
    return final


def score_with_models(c: Components, batch: RolloutBatch, step: int, timer: PhaseTimer) -> dict:
    """Old-policy log-probs (student forward), teacher log-probs of the student's tokens (teacher forward, no
    backward) and reference log-probs, at the rollout temperature; every rank gets the full `[N, L-1]` tensors."""
    args, metrics = c.args, {}

    def score(model, phase: str, what: str):
        with timer(phase):
            logp, _ = compute_logprobs(model, batch.tokens, temperature=args.rollout_temperature,
                                       micro_batch_size=args.micro_batch_size)
        check_finite(logp, batch.response_mask, f"{what} log-probs", step + 1)
        return logp

    if args.algo in IS_RL:
        batch.old_logp = score(c.student, "old_logp", "student")
        metrics |= batch_diagnostics(batch)
    if args.algo in NEEDS_TEACHER_LOGP:
        batch.teacher_logp = score(c.teacher, "teacher", "teacher")
        metrics |= teacher_diagnostics(batch)
    if c.reference is not None:
        batch.ref_logp = score(c.reference, "ref_logp", "reference")
    return metrics


def last_step_evaluated(args: Namespace) -> bool:
    return bool(args.eval_interval) and args.train_iters % args.eval_interval == 0 and args.train_iters > 0


# ------------------------------------------------------------------------------------------------ eval, export, checkpoints


def evaluate_student(c: Components) -> dict:
    args = c.args
    sampling = SamplingParams(temperature=args.eval_temperature, top_p=args.rollout_top_p,
                              max_new_tokens=args.max_response_len, stop=tuple(args.rollout_stop),
                              stop_token_ids=tuple(args.rollout_stop_token_ids), seed=args.seed)
    out = [None]
    with rollout_phase(c, version="eval"):
        if platform.is_rank0():
            out = [evaluate(c.engine, c.eval_prompts, reward=c.reward, k=args.eval_samples, sampling=sampling,
                            tokenizer=c.tokenizer, reward_workers=args.reward_workers)]
    dist.broadcast_object_list(out, src=0)
    return {f"eval/{k}": v for k, v in out[0]["overall"].items()}


def hf_template(c: Components) -> str:
    """An HF dir for the student's export: --student-hf, or a config.json written from the checkpoint meta
    next to the tokenizer files."""
    if c.args.student_hf:
        return c.args.student_hf
    import json
    import shutil
    from pathlib import Path

    out = Path(c.args.output_dir) / "hf_template"
    if platform.is_rank0():
        shutil.copytree(c.args.tokenizer, out, dirs_exist_ok=True)
        (out / "config.json").write_text(json.dumps(c.student.spec.hf_config, indent=2))
    platform.barrier()
    return str(out)


def teacher_logits_fn(c: Components):
    if c.args.algo != "gkd":
        return None
    from rlad_megatron.models.forward import position_ids

    if c.teacher.tp != c.student.tp or c.teacher.pp != 1 or c.student.pp != 1:
        raise ValueError("--algo gkd compares full vocab shards: teacher and student need the same TP and PP=1")

    def fn(tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            tokens = tokens.to(platform.device())
            return c.teacher.module(tokens, position_ids(tokens), None)

    return fn


def make_logger(c: Components, start_step: int):
    """A fresh run starts a new metrics.jsonl; a resumed one keeps the lines up to the resumed step, so
    the file reads as one uninterrupted run."""
    import json
    from pathlib import Path

    from rlad_megatron.metrics_log import METRICS_FILE, MetricsLogger

    path = Path(c.args.output_dir) / METRICS_FILE
    if platform.is_rank0() and path.exists():
        keep = [line for line in path.read_text().splitlines()
                if start_step and line.strip() and json.loads(line)["step"] <= start_step]
        path.write_text("".join(line + "\n" for line in keep))
    return MetricsLogger(c.args.output_dir, tensorboard_dir=c.args.tensorboard_dir, wandb_project=c.args.wandb_project,
                         total_steps=c.args.train_iters, start_step=start_step)


def train_state(c: Components, step: int) -> dict:
    return {"step": step, "prompt_position": c.train_prompts.position, "sft_pos": c.extra.get("sft_pos", 0)}


def save(c: Components, step: int) -> None:
    from rlad_megatron.checkpoint import save_checkpoint

    save_checkpoint(c.args.save, step, c.student, c.optimizer, c.scheduler, train_state(c, step),
                    keep_last=c.args.keep_last)


def resume(c: Components) -> dict:
    from pathlib import Path

    if not c.args.load or not (Path(c.args.load) / "latest").exists():  # first run of a resumable job
        return {"step": 0}
    from rlad_megatron.checkpoint import load_checkpoint

    state = load_checkpoint(c.args.load, c.student, c.optimizer, c.scheduler)
    if not state:
        return {"step": 0}
    c.train_prompts.position = state["prompt_position"]
    c.extra["sft_pos"] = state.get("sft_pos", 0)
    return state

