"""The RL loop. Each step:

    prompts  = next rollout_batch_size prompts
    rollouts = engine.generate(prompts x n_samples_per_prompt)          (rank 0, broadcast)
    rewards  = reward(rollouts);  A = group-normalised advantages       (+ dynamic sampling)
    old_logp = student forward;   teacher_logp = teacher forward        (vocab-parallel, same temperature)
    update   = num_updates_per_rollout optimizer steps with --algo's loss
    sync     = Megatron -> HF names -> buckets -> engine
    log / eval / save
"""

from __future__ import annotations

import time
from argparse import Namespace
from contextlib import contextmanager

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.advantages import grpo_advantages
from rlad_megatron.algos import IS_RL, NEEDS_TEACHER_LOGP
from rlad_megatron.batch import RolloutBatch, build_batch
from rlad_megatron.components import Components, build_components
from rlad_megatron.evaluation import evaluate
from rlad_megatron.models.forward import compute_logprobs
from rlad_megatron.rewards import score_batch
from rlad_megatron.rollout.base import Rollout, SamplingParams
from rlad_megatron.update import NonFiniteError, update_policy


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


class PhaseTimer:
    """Wall-clock per phase of a step: `perf/<phase>_s`, `perf/step_s`, `perf/tokens_per_s`."""

    def __init__(self) -> None:
        self.t0, self.phases = time.perf_counter(), {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self, tokens: float) -> dict:
        total = time.perf_counter() - self.t0
        return {**{f"perf/{k}_s": v for k, v in self.phases.items()}, "perf/step_s": total,
                "perf/tokens_per_s": tokens / total}


def score_with_models(c: Components, batch: RolloutBatch, step: int, timer: PhaseTimer) -> dict:
    """Old-policy log-probs (student forward) and teacher log-probs of the student's tokens (teacher forward,
    no backward), at the rollout temperature; every rank gets the full `[N, L-1]` tensors."""
    args, metrics = c.args, {}
    if args.algo in IS_RL:
        with timer("old_logp"):
            batch.old_logp, _ = compute_logprobs(c.student, batch.tokens, temperature=args.rollout_temperature,
                                                 micro_batch_size=args.micro_batch_size)
        check_finite(batch.old_logp, batch.response_mask, "student log-probs", step + 1)
        metrics |= batch_diagnostics(batch)
    if args.algo in NEEDS_TEACHER_LOGP:
        with timer("teacher"):
            batch.teacher_logp, _ = compute_logprobs(c.teacher, batch.tokens, temperature=args.rollout_temperature,
                                                     micro_batch_size=args.micro_batch_size)
        check_finite(batch.teacher_logp, batch.response_mask, "teacher log-probs", step + 1)
        metrics |= teacher_diagnostics(batch)
    return metrics


def last_step_evaluated(args: Namespace) -> bool:
    return bool(args.eval_interval) and args.train_iters % args.eval_interval == 0 and args.train_iters > 0


# ------------------------------------------------------------------------------------------------ rollouts


def sampling_params(args: Namespace, step: int) -> SamplingParams:
    return SamplingParams(temperature=args.rollout_temperature, top_p=args.rollout_top_p, top_k=args.rollout_top_k,
                          max_new_tokens=args.max_response_len, stop=tuple(args.rollout_stop),
                          stop_token_ids=tuple(args.rollout_stop_token_ids), seed=args.seed * 100_003 + step)


def generate_and_score(c: Components, samples, n: int, sampling: SamplingParams) -> tuple[list[Rollout], list[float]]:
    """Rank 0 generates `n` responses per prompt and scores them; every rank gets the same result."""
    payload = [None]
    if platform.is_rank0():
        prompts = [s.prompt_ids for s in samples for _ in range(n)]
        rollouts = c.engine.generate(prompts, sampling)
        texts = [r.text or c.tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in rollouts]
        rewards = score_batch(c.reward, texts, [s for s in samples for _ in range(n)],
                              num_workers=c.args.reward_workers, format_reward=c.args.format_reward)
        payload = [(rollouts, rewards)]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def collect_batch(c: Components, step: int) -> tuple[RolloutBatch, dict]:
    """Rollouts + rewards + advantages for one step. With --dynamic-sampling, groups whose rewards are all
    equal (zero advantage: no signal for GRPO or TRRD) are dropped and more prompts are drawn."""
    args = c.args
    if args.algo == "sft":
        return sft_batch(c), {}
    n, want = args.n_samples_per_prompt, args.rollout_batch_size
    kept: list[tuple[list[Rollout], list[float]]] = []  # groups with a reward signal
    spare: list[tuple[list[Rollout], list[float]]] = []  # zero-variance groups (advantage 0)
    drawn = 0
    for round_ in range(args.max_sampling_rounds if args.dynamic_sampling else 1):
        need = want - len(kept) if args.dynamic_sampling else want
        samples = c.train_prompts.next_batch(need)
        with rollout_phase(c, version=f"step{step}"):
            rollouts, rewards = generate_and_score(c, samples, n, sampling_params(args, step * 1000 + round_))
        drawn += need
        for g in range(need):
            group = (rollouts[g * n:(g + 1) * n], rewards[g * n:(g + 1) * n])
            informative = len(set(group[1])) > 1
            (kept if informative or not args.dynamic_sampling else spare).append(group)
        if len(kept) >= want:
            break
    zero_groups = len(spare) + sum(len(set(r)) == 1 for _, r in kept)
    groups = (kept + spare)[:want]  # top up with zero-advantage groups when sampling rounds run out
    kept_rollouts = [r for g, _ in groups for r in g]
    kept_rewards = [x for _, rs in groups for x in rs]
    rewards_t = torch.tensor(kept_rewards, dtype=torch.float32)
    if not torch.isfinite(rewards_t).all():
        raise NonFiniteError(f"step {step + 1}: the reward function returned non-finite values "
                             f"({int((~torch.isfinite(rewards_t)).sum())} of {len(rewards_t)}; --reward {c.reward})")
    adv = grpo_advantages(rewards_t.view(-1, n)).view(-1)
    batch = build_batch(kept_rollouts, rewards_t, adv, pad_id=pad_id(c))
    lengths = torch.tensor([len(r.output_ids) for r in kept_rollouts], dtype=torch.float32)
    metrics = {
        "reward/mean": float(rewards_t.mean()),
        "reward/accuracy": float((rewards_t >= 1.0).float().mean()),
        "rollout/zero_adv_group_frac": zero_groups / max(drawn, 1),
        "rollout/groups_drawn": float(drawn),
        "rollout/response_len": float(lengths.mean()),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in kept_rollouts) / len(kept_rollouts),
    }
    return batch, metrics


def pad_id(c: Components) -> int:
    tok = c.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def check_finite(x: torch.Tensor, mask: torch.Tensor, what: str, step: int) -> None:
    """`x` is identical on every rank, so every rank raises together. Steps are counted from 1, as logged."""
    bad = ~torch.isfinite(x) & (mask > 0)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(f"step {step}: non-finite {what} ({int(bad.sum())} tokens, first at sequence {row}, "
                             f"position {col}); lower --lr or check the checkpoint")


def batch_diagnostics(batch: RolloutBatch) -> dict:
    """Train-vs-rollout log-prob gap: engine vs Megatron for the same weights."""
    m = batch.response_mask > 0
    return {"rollout/logp_gap_abs": float((batch.old_logp - batch.rollout_logp)[m].abs().mean())}


def teacher_diagnostics(batch: RolloutBatch) -> dict:
    m = batch.response_mask > 0
    return {"teacher/logp_student_minus_teacher": float((batch.old_logp - batch.teacher_logp)[m].mean())}


# ------------------------------------------------------------------------------------------------ SFT


def sft_traces(c: Components) -> list[Rollout]:
    """Offline distillation data. `--sft-source teacher`: the teacher's weights go to the engine, it samples
    n_samples_per_prompt answers for the training prompts, and only correct ones are kept (rejection
    sampling); the engine is then given back the student's weights. `dataset`: the reference traces."""
    args = c.args
    samples = c.train_prompts.samples
    if args.sft_source == "dataset":
        traces = []
        for s in samples:
            target = s.meta.get("target") or s.meta.get("response")
            if target is None:
                raise ValueError(f"--sft-source dataset: sample {s.prompt!r} has no reference response")
            ids = c.tokenizer.encode(target, add_special_tokens=False) + [c.tokenizer.eos_token_id]
            traces.append(Rollout(prompt_ids=s.prompt_ids, output_ids=ids, output_logprobs=[0.0] * len(ids),
                                  finish_reason="stop"))
        return traces
    samples = samples[: args.rollout_batch_size * args.train_iters]  # the prompts RL sees in the same budget
    c.extra["engine_stale"] = True
    student_engine = c.engine
    if c.teacher.spec.hf_config != c.student.spec.hf_config:  # the engine has the student's shapes
        from rlad_megatron.components import build_engine

        c.engine = build_engine(args, c.teacher.spec, c.tokenizer, model_dir=args.teacher_hf)
    try:
        with rollout_phase(c, version="teacher", model=c.teacher):
            rollouts, rewards = generate_and_score(c, samples, args.n_samples_per_prompt, sampling_params(args, -1))
    finally:
        if c.engine is not student_engine:
            if c.engine is not None:
                c.engine.shutdown()
            c.engine = student_engine
    kept = [r for r, rew in zip(rollouts, rewards) if rew >= 1.0]
    if not kept:
        raise RuntimeError("--algo sft: the teacher solved none of the training prompts; nothing to distil")
    c.extra["engine_stale"] = True  # the engine holds the teacher now
    return kept


def sft_batch(c: Components) -> RolloutBatch:
    pool = c.extra["sft_pool"]
    n = c.args.rollout_batch_size * c.args.n_samples_per_prompt
    start = c.extra.get("sft_pos", 0)
    picks = [pool[(start + i) % len(pool)] for i in range(n)]
    c.extra["sft_pos"] = start + n
    zeros = torch.zeros(n)
    return build_batch(picks, zeros + 1.0, zeros, pad_id=pad_id(c))


# ------------------------------------------------------------------------------------------------ sync/eval/ckpt


@contextmanager
def rollout_phase(c: Components, version: str, model=None):
    """The engine holds current weights inside the block. Colocated SGLang on GPU: optimizer and teacher
    leave GPU memory, the engine resumes its weights, the student is pushed and leaves too, the engine
    resumes its KV cache; on exit the engine releases everything and training state comes back."""
    if c.extra.get("engine_stale"):
        if c.offloader is None:
            c.extra["sync_metrics"] = sync_weights(c, version, model)
        else:
            from rlad_megatron.offload import to_rollout

            out = {}
            to_rollout(c.engine, c.offloader, lambda: out.update(sync_weights(c, version, model)),
                       before_push=("optimizer", "teacher"), after_push=("student",))
            c.extra["sync_metrics"] = out
    elif c.offloader is not None:
        c.offloader.offload("optimizer", "teacher", "student")
        if c.engine is not None:
            c.engine.resume_memory(("weights", "kv_cache", "cuda_graph"))
    try:
        yield
    finally:
        if c.offloader is not None:
            from rlad_megatron.offload import to_training

            to_training(c.engine, c.offloader, "student", "optimizer", "teacher")


def sync_weights(c: Components, version: str, model=None) -> dict:
    """Megatron model (default: the student) -> HF-named full tensors (TP gathered, PP broadcast) -> buckets
    -> engine."""
    from rlad_megatron.convert import export_hf_weights
    from rlad_megatron.rollout.weight_sync import push_weights

    c.extra["engine_stale"] = False
    t0 = time.perf_counter()
    stream = export_hf_weights(model or c.student)
    if platform.is_rank0():
        stats = push_weights(c.engine, stream, version=version, bucket_bytes=c.args.update_weight_buffer_size)
        out = {"sync/seconds": stats.seconds, "sync/buckets": float(stats.buckets)}
    else:
        for _ in stream:
            pass
        out = {}
    if c.args.check_weight_sync and model is None:
        out["sync/probe_logp_max_diff"] = check_sync(c)
    out.setdefault("sync/seconds", time.perf_counter() - t0)
    return out


def check_sync(c: Components) -> float:
    """Engine log-probs of a fixed probe sequence vs the Megatron student's (after a sync)."""
    probe = c.eval_prompts[0] if c.eval_prompts else c.train_prompts.samples[0]
    ids = list(probe.prompt_ids) + [pad_id(c)] * 4
    ref, _ = compute_logprobs(c.student, torch.tensor([ids]), temperature=1.0)
    diff = [0.0]
    if platform.is_rank0():
        eng = c.engine.score([ids], [len(probe.prompt_ids)], temperature=1.0)[0]
        mine = ref[0, len(probe.prompt_ids) - 1:]
        diff = [float((torch.tensor(eng) - mine).abs().max())]
    dist.broadcast_object_list(diff, src=0)
    return diff[0]


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

