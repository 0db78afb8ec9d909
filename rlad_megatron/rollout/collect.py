"""Rollout collection for one step: generate on rank 0, reward, broadcast, group advantages, dynamic
sampling; and the offline-distillation (SFT) data path."""

from __future__ import annotations

from argparse import Namespace

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.advantages import grpo_advantages
from rlad_megatron.batch import RolloutBatch, build_batch
from rlad_megatron.components import Components, pad_id
from rlad_megatron.evaluation import rollout_and_score
from rlad_megatron.rollout.base import Rollout, SamplingParams
from rlad_megatron.rollout.phase import rollout_phase
from rlad_megatron.update import NonFiniteError


def sampling_params(args: Namespace, step: int) -> SamplingParams:
    return SamplingParams(temperature=args.rollout_temperature, top_p=args.rollout_top_p, top_k=args.rollout_top_k,
                          max_new_tokens=args.max_response_len, stop=tuple(args.rollout_stop),
                          stop_token_ids=tuple(args.rollout_stop_token_ids), seed=args.seed * 100_003 + step)


def generate_and_score(c: Components, samples, n: int, sampling: SamplingParams) -> tuple[list[Rollout], list[float]]:
    """Rank 0 generates `n` responses per prompt and scores them; every rank gets the same result."""
    payload = [None]
    if platform.is_rank0():
        rollouts, _, rewards = rollout_and_score(c.engine, samples, reward=c.reward, n=n, sampling=sampling,
                                                 tokenizer=c.tokenizer, reward_workers=c.args.reward_workers,
                                                 format_reward=c.args.format_reward)
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

