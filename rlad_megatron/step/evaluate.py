"""Held-out evaluation of the student during training: the engine (holding the student's current weights) samples
`--eval-samples` answers per eval prompt, the training reward scores them, `evaluation.summarize` reduces them."""

from __future__ import annotations

from dataclasses import replace

import torch.distributed as dist

from rlad_megatron.evaluation import subset_of, summarize
from rlad_megatron.rollout.generate import generate_and_score, per_prompt
from rlad_megatron.step.run import Run


def evaluate_student(run: Run) -> dict:
    """`eval/<metric>` of the overall row (Mean@k, Pass@k, prompts), identical on every rank."""
    cfg = run.rollout
    out: list = [None]
    if run.engine is not None:
        reward = replace(run.reward, format_reward=0.0)  # Mean@k averages the scores: correctness only
        _, _, scores = generate_and_score(run.engine, run.eval_prompts, n=cfg.eval_samples, sampling=cfg.eval_sampling,
                                          tokenizer=run.tokenizer, reward=reward)
        out = [summarize(per_prompt(scores, cfg.eval_samples), [subset_of(s) for s in run.eval_prompts],
                         cfg.eval_samples)]
    dist.broadcast_object_list(out, src=0)
    return {f"eval/{k}": v for k, v in out[0]["overall"].items()}
