"""One step's rollouts: generate (every engine) -> reward (per sample, overlapping) -> group advantages ->
`RolloutBatch`, with dynamic sampling.

The engines hold the current student when this runs (`step.sync.sync_weights`); several dynamic-sampling rounds
generate inside the same rollout phase. Every rank ends with the same batch.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from rlad_megatron import platform
from rlad_megatron.advantages import dynamic_sampling_mask, grpo_advantages
from rlad_megatron.batch import RolloutBatch, build_batch
from rlad_megatron.rollout.base import Rollout, SamplingParams
from rlad_megatron.step.diagnostics import NonFiniteError
from rlad_megatron.step.generate import generate_everywhere
from rlad_megatron.step.run import Run

SUMMED = ("perf/generate_s", "rollout/reward_timeouts")


def round_sampling(run: Run, step: int, round_: int) -> SamplingParams:
    """The sampler of one generation round; sequence j of the round samples with seed `seed + j`."""
    return replace(run.rollout.sampling, seed=run.rollout.seed * 100_003 + step * 1000 + round_)


def collect_rollouts(run: Run, step: int) -> tuple[RolloutBatch, dict]:
    """Rollouts + rewards + advantages for one step. With --dynamic-sampling, groups whose rewards are all equal
    (zero advantage: no signal for GRPO or TRRD) are dropped and more prompts are drawn, for at most
    --max-sampling-rounds rounds; the batch is then topped up with zero-advantage groups."""
    cfg = run.rollout
    n, want = cfg.n_samples, cfg.prompts_per_step
    kept: list[tuple[list[Rollout], list[float]]] = []  # groups with a reward signal
    spare: list[tuple[list[Rollout], list[float]]] = []  # zero-variance groups (advantage 0)
    drawn, metrics = 0, {}
    for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        need = want - len(kept) if cfg.dynamic_sampling else want
        samples = run.train_prompts.next_batch(need)
        rollouts, rewards, load = generate_everywhere(run, samples, n, round_sampling(run, step, round_), run.scorer,
                                                      f"step {step + 1} rollouts (round {round_ + 1})")
        metrics = {k: metrics.get(k, 0.0) + v if k in SUMMED else max(metrics.get(k, 0.0), v)
                   for k, v in load.items()}  # seconds and timeouts add up over rounds; load ratios: the worst
        check_rewards(rewards, step, run.reward.name)
        drawn += need
        informative = dynamic_sampling_mask(torch.tensor(rewards).view(need, n)).tolist()
        for g in range(need):
            group = (rollouts[g * n:(g + 1) * n], rewards[g * n:(g + 1) * n])
            (kept if informative[g] or not cfg.dynamic_sampling else spare).append(group)
        if len(kept) >= want:
            break
    groups = (kept + spare)[:want]
    flat = [r for g, _ in groups for r in g]
    rewards_t = torch.tensor([x for _, rs in groups for x in rs], dtype=torch.float32)
    adv = grpo_advantages(rewards_t.view(-1, n)).view(-1)
    batch = build_batch(flat, rewards_t, adv, pad_id=run.pad_id)
    zero_groups = len(spare) + sum(len(set(r)) == 1 for _, r in kept)
    if cfg.save_dir:
        save_rollouts(Path(cfg.save_dir) / f"rollouts_step{step + 1:06d}.jsonl", flat, rewards_t, adv)
    return batch, rollout_metrics(flat, rewards_t, zero_groups, drawn) | metrics


def check_rewards(rewards: list[float], step: int, reward: str) -> None:
    t = torch.tensor(rewards, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"step {step + 1}: the reward function returned non-finite values "
                             f"({int((~torch.isfinite(t)).sum())} of {len(t)}; --reward {reward})")


def rollout_metrics(rollouts: list[Rollout], rewards: torch.Tensor, zero_groups: int, drawn: int) -> dict:
    lengths = torch.tensor([len(r.output_ids) for r in rollouts], dtype=torch.float32)
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/accuracy": float((rewards >= 1.0).float().mean()),
        "rollout/zero_adv_group_frac": zero_groups / max(drawn, 1),
        "rollout/groups_drawn": float(drawn),
        "rollout/response_len": float(lengths.mean()),
        "rollout/truncated_frac": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
    }


def save_rollouts(path: Path, rollouts: list[Rollout], rewards: torch.Tensor, advantages: torch.Tensor) -> None:
    """`--save-rollouts`: one JSON line per sequence (token ids, log-probs, finish, reward, advantage); rank 0."""
    if not platform.is_rank0():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r, rew, a in zip(rollouts, rewards.tolist(), advantages.tolist(), strict=True):
            f.write(json.dumps({"prompt_ids": r.prompt_ids, "output_ids": r.output_ids,
                                "output_logprobs": r.output_logprobs, "finish_reason": r.finish_reason,
                                "reward": rew, "advantage": a}) + "\n")
