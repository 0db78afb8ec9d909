"""The comparison's settings (`Recipe`, the `--quick` and tuning budgets) and the exact commands it runs:
the tiny pair (flag for flag `examples/rlad_tiny_cpu.sh`), one `rlad-train` per method and seed, `rlad-eval`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("grpo", "kdrl", "rlad", "sft")
METHOD_LABEL = {"grpo": "GRPO", "kdrl": "KDRL", "rlad": "RLAD (TRRD, alpha 0.5)",
                "sft": "SFT distillation (teacher traces)"}
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
# the diagnostics averaged per method over all logged steps (metric key -> report label)
DIAGNOSTICS = {
    "rollout/reward_mean": "train reward (T=1)",
    "rollout/zero_adv_group_frac": "zero-adv. groups",
    "actor/zero_adv_frac": "zero-adv. tokens",
    "actor/ratio_mean": "mean ratio r",
    "actor/clip_frac_low": "clip low",
    "actor/clip_frac_high": "clip high",
    "actor/gate_blocked_pos": "gate blocked A>0",
    "actor/gate_blocked_neg": "gate blocked A<0",
    "actor/gate_enabled_pos": "gate enabled A>0",
    "actor/gate_enabled_neg": "gate enabled A<0",
    "actor/teacher_clamp_frac": "teacher clamp",
    "actor/log_ratio_teacher_mean": "log pi_S/pi_T",
    "actor/kl_teacher": "KL(S‖T) k2",
    "actor/entropy": "entropy",
}


@dataclass
class Recipe:
    """Every knob of the comparison. Only the method differs between runs; `kl_coef` is KDRL's own knob."""

    # the pair: exactly examples/rlad_tiny_cpu.sh
    teacher_iters: int = 1500
    student_iters: int = 1000
    # RL budget, identical for every method
    rl_iters: int = 400
    rollout_batch_size: int = 8  # prompts per step
    n_samples: int = 8  # samples per prompt (SFT: sequences per step = the same 64)
    micro_batch_size: int = 32
    num_updates: int = 2  # optimizer steps per rollout batch (pi_S != pi_old from the second on)
    lr: float = 1e-4
    lr_warmup_steps: int = 10
    kl_coef: float = 0.01  # KDRL only (tuned: --tune)
    alpha: float = 0.5  # RLAD only (the paper's value)
    max_response_len: int = 60
    eval_interval: int = 20
    eval_size: int = 256
    eval_seed: int = 1234  # builtin eval split: generator seed 1234 + 10**9, disjoint from every training seed
    nproc: int = 2
    teacher_tp: int = 2
    # reasoning-gym builds item i of seed S from Random(S + i): seeds 10^4 apart give each seed its own, disjoint
    # training prompts (seeds 1, 2, 3 would draw the same items shifted by one)
    seeds: tuple[int, ...] = (10_000, 20_000, 30_000)
    methods: tuple[str, ...] = METHODS
    # final sampled evaluation (rlad-eval), the paper's eval sampling
    final_k: int = 8
    final_temperature: float = 0.6
    final_top_p: float = 0.95

    def check(self) -> None:
        if self.rl_iters % self.eval_interval:
            raise ValueError(f"rl_iters {self.rl_iters} must be a multiple of eval_interval {self.eval_interval}")
        if self.rl_iters * self.num_updates <= self.lr_warmup_steps:
            raise ValueError(f"{self.rl_iters} steps x {self.num_updates} updates must exceed the "
                             f"{self.lr_warmup_steps} warm-up steps")
        ordered = sorted(self.seeds)
        if any(b - a < self.rl_iters * self.rollout_batch_size for a, b in itertools.pairwise(ordered)):
            import warnings

            warnings.warn(f"seeds {self.seeds} are closer than {self.rl_iters * self.rollout_batch_size}: their "
                          "training prompts overlap (reasoning-gym item i of seed S is Random(S + i))", stacklevel=2)
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")


QUICK = dict(teacher_iters=500, student_iters=300, rl_iters=4, eval_interval=2, eval_size=64, seeds=(1,),
             lr_warmup_steps=2, final_k=4)
# What was tuned before fixing `Recipe` (short runs: `--tune`, 1 seed, a separate tuning eval seed, same
# grid for every method): the shared lr x updates-per-rollout, then KDRL's kl_coef at the chosen setting.
TUNE_GRID = dict(lr=(1e-4, 3e-4), num_updates=(1, 2))
TUNE_KL = (0.01, 0.1, 1.0)
TUNE_BUDGET = dict(rl_iters=100, eval_interval=25, seeds=(1,), eval_seed=777)
TUNE_TOL = 0.02  # 2 points of accuracy


# ------------------------------------------------------------------------------------------------ commands


def pair_commands(out: Path, r: Recipe, py: str = "python") -> list[tuple[str, list[str], Path]]:
    """(name, argv, the dir it produces) for the pair, flag for flag examples/rlad_tiny_cpu.sh."""
    common = ["--prompt-data", "builtin:addition", "--eval-data", "builtin:addition", "--eval-size", "256",
              "--no-chat-template", "--max-response-len", "60"]
    sft = ["--algo", "sft", "--sft-source", "dataset", "--train-size", "100000", "--rollout-batch-size", "64",
           "--n-samples-per-prompt", "1", "--micro-batch-size", "64", "--lr", "3e-3", "--lr-warmup-steps", "20"]
    return [
        ("make_teacher", [py, "tools/make_tiny_model.py", "--out", str(out / "teacher_init"), "--size", "teacher",
                          "--seed", "1"], out / "teacher_init"),
        ("make_student", [py, "tools/make_tiny_model.py", "--out", str(out / "student_init"), "--size", "student",
                          "--seed", "2"], out / "student_init"),
        ("sft_teacher", [py, "-m", "rlad_megatron.train", *common, *sft, "--student-hf", str(out / "teacher_init"),
                         "--train-iters", str(r.teacher_iters), "--min-lr", "3e-4", "--lr-decay-style", "cosine",
                         "--seed", "1", "--output-dir", str(out / "sft_teacher"), "--save-hf", str(out / "teacher")],
         out / "teacher"),
        ("sft_student", [py, "-m", "rlad_megatron.train", *common, *sft, "--student-hf", str(out / "student_init"),
                         "--train-iters", str(r.student_iters), "--seed", "2", "--output-dir",
                         str(out / "sft_student"), "--save-hf", str(out / "student")], out / "student"),
    ]


def method_flags(method: str, r: Recipe, teacher: Path) -> list[str]:
    if method == "grpo":
        return ["--algo", "grpo"]
    if method == "kdrl":
        return ["--algo", "kdrl", "--teacher-hf", str(teacher), "--kl-coef", str(r.kl_coef), "--kl-estimator", "k2"]
    if method == "rlad":
        return ["--algo", "rlad", "--teacher-hf", str(teacher), "--alpha", str(r.alpha)]
    if method == "sft":
        return ["--algo", "sft", "--sft-source", "teacher", "--teacher-hf", str(teacher)]
    raise ValueError(method)


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / f"{method}_seed{seed}"


def rl_command(method: str, seed: int, r: Recipe, out: Path, pair: Path, py: str = "python") -> list[str]:
    """One training run. Everything but `method_flags` is shared by all methods."""
    d = run_dir(out, method, seed)
    launcher = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={r.nproc}"]
    return [*launcher, "-m", "rlad_megatron.train",
            "--prompt-data", "builtin:addition", "--eval-data", "builtin:addition", "--no-chat-template",
            "--max-response-len", str(r.max_response_len), "--train-size", str(r.rl_iters * r.rollout_batch_size),
            "--eval-size", str(r.eval_size), "--eval-seed", str(r.eval_seed),
            "--student-hf", str(pair / "student"), *method_flags(method, r, pair / "teacher"),
            "--tensor-model-parallel-size", "1", "--teacher-tensor-model-parallel-size", str(r.teacher_tp),
            "--rollout-batch-size", str(r.rollout_batch_size), "--n-samples-per-prompt", str(r.n_samples),
            "--micro-batch-size", str(r.micro_batch_size), "--num-updates-per-rollout", str(r.num_updates),
            "--lr", str(r.lr), "--lr-warmup-steps", str(r.lr_warmup_steps), "--train-iters", str(r.rl_iters),
            "--eval-interval", str(r.eval_interval), "--seed", str(seed),
            "--output-dir", str(d), "--save-hf", str(d / "student_hf")]


def eval_argv(model: Path, out_json: Path, r: Recipe) -> list[str]:
    """rlad-eval of one model on the same held-out set, k samples at the paper's eval sampling."""
    return ["--model", str(model), "--data", "builtin:addition", "--size", str(r.eval_size), "--seed",
            str(r.eval_seed), "--k", str(r.final_k), "--temperature", str(r.final_temperature), "--top-p",
            str(r.final_top_p), "--max-new-tokens", str(r.max_response_len), "--no-chat-template", "--quiet",
            "--output-json", str(out_json)]
