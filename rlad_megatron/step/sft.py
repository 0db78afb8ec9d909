"""Offline distillation data: the training traces (`--sft-source teacher`: rejection-sampled teacher answers;
`dataset`: the prompt set's reference responses) and the fixed-size SFT batch of each step."""

from __future__ import annotations

import torch

from rlad_megatron.batch import RolloutBatch, build_batch
from rlad_megatron.rollout.base import Rollout
from rlad_megatron.step.rollouts import generate_scored, round_sampling
from rlad_megatron.step.run import Run
from rlad_megatron.step.sync import release_engines, sync_weights


def dataset_traces(run: Run) -> list[Rollout]:
    """Each prompt with its reference response (`target` or `response` in the sample's meta) and EOS."""
    traces = []
    tok = run.tokenizer
    for s in run.train_prompts.samples:
        target = s.meta.get("target") or s.meta.get("response")
        if target is None:
            raise ValueError(f"--sft-source dataset: sample {s.prompt!r} has no reference response")
        ids = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
        traces.append(Rollout(prompt_ids=s.prompt_ids, output_ids=ids, output_logprobs=[0.0] * len(ids),
                              finish_reason="stop"))
    return traces


def teacher_traces(run: Run) -> list[Rollout]:
    """The teacher's weights go to the engine (a second engine with the teacher's shapes when they differ from the
    student's), it samples `n_samples_per_prompt` answers for the prompts RL would see in the same budget, and only
    the correct ones are kept (rejection sampling). The next sync gives the engine the student back."""
    cfg = run.rollout
    samples = run.train_prompts.samples[: cfg.prompts_per_step * run.loop.train_iters]
    student_engine = run.engine
    if run.teacher.spec.hf_config != run.policy.model.spec.hf_config:  # the engine has the student's shapes
        run.engine = run.engine_factory(run.teacher.spec, run.teacher_dir)
    try:
        sync_weights(run, model=run.teacher, label="teacher")
        rollouts, rewards = generate_scored(run, samples, cfg.n_samples, round_sampling(run, -1, 0))
        release_engines(run)
    finally:
        if run.engine is not student_engine:
            if run.engine is not None:
                run.engine.shutdown()
            run.engine, run.engine_holds = student_engine, None
    kept = [r for r, rew in zip(rollouts, rewards) if rew >= 1.0]
    if not kept:
        raise RuntimeError("--algo sft: the teacher solved none of the training prompts; nothing to distil")
    return kept


def sft_batch(run: Run) -> RolloutBatch:
    """The next `prompts_per_step x n_samples` traces, cycling through the pool; reward 1, advantage 0."""
    pool, n = run.sft_traces, run.rollout.sequences_per_step
    start = run.state.sft_position
    picks = [pool[(start + i) % len(pool)] for i in range(n)]
    run.state.sft_position = start + n
    zeros = torch.zeros(n)
    return build_batch(picks, zeros + 1.0, zeros, pad_id=run.pad_id)
