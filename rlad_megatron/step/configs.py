"""The flags as small typed configs, built once at the trainer boundary (`step.run.build_run`): the loop's schedule,
the rollouts and the weight sync. (The loss has `step.algos.LossConfig`, the optimizer steps
`step.update.UpdateConfig`.) Nothing after `build_run` reads the argparse Namespace."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, replace

from rlad_megatron.rollout.base import SamplingParams


@dataclass(frozen=True)
class LoopConfig:
    """The loop's own schedule: steps, evals, checkpoints, outputs."""

    train_iters: int
    eval_interval: int = 0
    save: str | None = None
    save_interval: int = 0
    keep_last: int = 2
    load: str | None = None
    save_hf: str | None = None
    hf_template: str | None = None  # --student-hf: config + tokenizer files for the export
    tokenizer_dir: str | None = None
    output_dir: str = "outputs/run"
    tensorboard_dir: str | None = None
    wandb_project: str | None = None

    @classmethod
    def from_args(cls, args: Namespace) -> LoopConfig:
        return cls(train_iters=args.train_iters, eval_interval=args.eval_interval, save=args.save,
                   save_interval=args.save_interval, keep_last=args.keep_last, load=args.load, save_hf=args.save_hf,
                   hf_template=args.student_hf, tokenizer_dir=args.tokenizer or args.student_hf,
                   output_dir=args.output_dir, tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project)

    def eval_due(self, step: int) -> bool:
        return bool(self.eval_interval) and step % self.eval_interval == 0

    def save_due(self, step: int) -> bool:
        return bool(self.save and self.save_interval) and step % self.save_interval == 0


def sampling_from_args(args: Namespace, *, temperature: float, seed: int | None = None) -> SamplingParams:
    """The sampler of the `--rollout-*` flags at `temperature` (training rollouts and evaluation share it)."""
    return SamplingParams(temperature=temperature, top_p=args.rollout_top_p, top_k=args.rollout_top_k,
                          max_new_tokens=args.max_response_len, stop=tuple(args.rollout_stop),
                          stop_token_ids=tuple(args.rollout_stop_token_ids), seed=seed)


@dataclass(frozen=True)
class RolloutConfig:
    """Rollouts per step (`--rollout-batch-size` prompts x `--n-samples-per-prompt`), their sampler, dynamic
    sampling, and the evaluation sampler."""

    prompts_per_step: int
    n_samples: int
    sampling: SamplingParams  # seeded per step and sampling round (`step.rollouts.round_sampling`)
    eval_sampling: SamplingParams
    seed: int
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    eval_samples: int = 1
    sft_source: str = "teacher"
    chunk_groups: int = 0  # prompt groups per engine request (--rollout-chunk-groups; 0: auto)
    engine_batches_in_flight: bool = False  # SGLang batches concurrent requests; the HF engine runs one at a time
    gpus_per_engine: int = 1  # --rollout-num-gpus-per-engine
    save_dir: str | None = None  # --save-rollouts: every step's rollouts as JSONL (rank 0)

    @classmethod
    def from_args(cls, args: Namespace) -> RolloutConfig:
        # evals sample with the training sampler's top-p and stops, at --eval-temperature, without its top-k
        eval_sampling = replace(sampling_from_args(args, temperature=args.eval_temperature, seed=args.seed), top_k=-1)
        return cls(prompts_per_step=args.rollout_batch_size, n_samples=args.n_samples_per_prompt,
                   sampling=sampling_from_args(args, temperature=args.rollout_temperature), seed=args.seed,
                   dynamic_sampling=args.dynamic_sampling, max_sampling_rounds=args.max_sampling_rounds,
                   eval_sampling=eval_sampling, eval_samples=args.eval_samples, sft_source=args.sft_source,
                   chunk_groups=args.rollout_chunk_groups,
                   engine_batches_in_flight=args.rollout_engine in ("sglang", "sglang-remote"),
                   gpus_per_engine=args.rollout_num_gpus_per_engine,
                   save_dir=args.save_rollouts)

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.n_samples


@dataclass(frozen=True)
class SyncConfig:
    bucket_bytes: int = 512 * 2**20  # --update-weight-buffer-size
    check: bool = False  # --check-weight-sync: engine vs Megatron log-probs of a probe after each student push

    @classmethod
    def from_args(cls, args: Namespace) -> SyncConfig:
        return cls(bucket_bytes=args.update_weight_buffer_size, check=args.check_weight_sync)
