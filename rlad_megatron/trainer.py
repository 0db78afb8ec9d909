"""The RL loop. Each step:

    batch    = rollouts (engine generates -> reward -> group advantages) | SFT traces (--algo sft)
    score    = old-policy, teacher and reference log-probs of the batch      (vocab-parallel, no rank gathers it)
    update   = --num-updates-per-rollout optimizer steps with --algo's loss
    save     = checkpoint (before the sync: a colocated engine takes the GPU memory training state held)
    sync     = Megatron -> HF names -> buckets -> engine (when a rollout or an eval comes next)
    eval     = held-out Mean@k / Pass@k with the engine
    log

Everything the steps share is the typed `Run` (`step/run.py`); each line below is one module of `step/`.
"""

from __future__ import annotations

from argparse import Namespace

from rlad_megatron import platform
from rlad_megatron.batch import RolloutBatch
from rlad_megatron.step.diagnostics import PhaseTimer
from rlad_megatron.step.evaluate import evaluate_student
from rlad_megatron.step.rollouts import collect_rollouts
from rlad_megatron.step.run import Run, build_run, export_student, open_log, resume_run, save_run
from rlad_megatron.step.score import loss_context, score_batch
from rlad_megatron.step.sft import dataset_traces, sft_batch, teacher_traces
from rlad_megatron.step.sync import release_engines, sync_weights
from rlad_megatron.step.update import update_policy


def train(args: Namespace) -> dict:
    run = build_run(args)
    resume_run(run)
    log = open_log(run)
    if not run.algo.rl:
        run.sft_traces = teacher_traces(run) if run.rollout.sft_source == "teacher" else dataset_traces(run)
    if run.state.step == 0 and run.eval_prompts:
        log.log(0, say("eval before training", sync_weights(run) | evaluate_student(run) | run.data_metrics))
    metrics: dict = {}
    while run.state.step < run.loop.train_iters:
        timer = PhaseTimer()
        with timer("rollout"):
            batch, metrics = next_batch(run)
        metrics |= score_batch(batch, run.algo, student=run.policy.model, teacher=run.teacher, reference=run.reference,
                               temperature=run.loss.temperature, cfg=run.update, step=run.state.step, timer=timer)
        with timer("update"):
            metrics |= update_policy(run.policy, batch, run.update, run.loss,
                                     loss_context(run.algo, run.policy.model, run.teacher), step=run.state.step + 1)
        run.state.step += 1
        if run.loop.save_due(run.state.step):
            save_run(run)
        evaluate_now = run.loop.eval_due(run.state.step) and run.eval_prompts
        if evaluate_now or (run.algo.rl and run.state.step < run.loop.train_iters):
            with timer("sync"):
                metrics |= sync_weights(run)
        if evaluate_now:
            with timer("eval"):
                metrics |= evaluate_student(run)
        log.log(run.state.step, metrics | timer.metrics(tokens=batch.response_tokens))
    return finish(run, log, metrics)


def next_batch(run: Run) -> tuple[RolloutBatch, dict]:
    """This step's training batch: rollouts of the student (the engine holds its weights) or SFT traces."""
    if not run.algo.rl:
        return sft_batch(run), {}
    sync_weights(run)  # a no-op after the previous step's sync; pushes after a resume
    batch, metrics = collect_rollouts(run, run.state.step)
    release_engines(run)
    return batch, metrics


def finish(run: Run, log, last: dict) -> dict:
    """The final held-out eval (unless the last step had one), the HF export; returns the `eval/*` metrics."""
    final = {k: v for k, v in last.items() if k.startswith("eval/")}
    if not final and run.eval_prompts:
        final = sync_weights(run) | evaluate_student(run)
        final = {k: v for k, v in final.items() if k.startswith("eval/")}
        log.log(run.loop.train_iters, final)
    log.close()
    release_engines(run)  # the training state back on the GPU for the export
    if run.loop.save_hf:
        export_student(run)
    return final


def say(what: str, metrics: dict) -> dict:
    if platform.is_rank0():
        print(f"{what}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/")), flush=True)
        if "data/eval_train_overlap" in metrics:
            print(f"held-out check: {metrics['data/eval_train_overlap']:.0f} of {metrics['data/eval_prompts']:.0f} "
                  f"eval prompts are among the {metrics['data/train_prompts']:.0f} training prompts", flush=True)
    return metrics
