"""Held-out evaluation of the student during training: every engine (holding the student's current weights) samples
`--eval-samples` answers for its share of the eval prompts, the training reward (without the format bonus) scores
them, `evaluation.summarize` reduces them; identical on every rank."""

from __future__ import annotations

from rlad_megatron.evaluation import subset_of, summarize
from rlad_megatron.rollout.generate import per_prompt
from rlad_megatron.step.generate import generate_everywhere
from rlad_megatron.step.run import Run


def evaluate_student(run: Run) -> dict:
    """`eval/<metric>` of the overall row (Mean@k, Pass@k, prompts)."""
    cfg = run.rollout
    _, scores, _ = generate_everywhere(run, run.eval_prompts, cfg.eval_samples, cfg.eval_sampling, run.eval_scorer,
                                       "held-out evaluation")
    summary = summarize(per_prompt(scores, cfg.eval_samples), [subset_of(s) for s in run.eval_prompts],
                        cfg.eval_samples)
    return {f"eval/{k}": v for k, v in summary["overall"].items()}
