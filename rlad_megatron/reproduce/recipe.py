"""The comparison's settings (`Recipe`, the tuning grid and its selection rule, `--quick`) and the exact commands
it runs: the pair (teacher and student built from nothing), one `rlad-train` per run, `rlad-eval`.

Task: column addition of 2-3 terms of exactly 4 digits (`builtin:addition` with `TASK_CONFIG`), an item space of
1e8 (2 terms) / 1e12 (3 terms). Every prompt belongs to one split by a hash of its text (`data.partition`), so the
held-out eval and tuning-eval sets cannot share a prompt with any training set of any stage; the report still
regenerates every set and prints the measured overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("grpo", "kdrl", "rlad", "sft")
METHOD_LABEL = {"grpo": "GRPO", "kdrl": "KDRL", "rlad": "RLAD (TRRD)", "sft": "SFT distillation (teacher traces)"}
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
TASK_CONFIG = ("min_digits=4", "max_digits=4", "min_terms=2", "max_terms=3")
# generator seeds of the stages, 1e7 apart: reasoning-gym builds item i of seed S from Random(S + i), so seeds
# closer than a set's size draw the same items shifted by one
TEACHER_SEED, STUDENT_SEED, TUNE_SEED = 10_000_000, 20_000_000, 100_000_000
FINAL_SEEDS = (110_000_000, 120_000_000, 130_000_000, 140_000_000, 150_000_000)
# each method's own knob (flag, grid, default); SFT distillation has none, so its knob is more learning rates
KNOB = {"grpo": ("ref_kl", (0.0, 0.01, 0.1), 0.0), "kdrl": ("kl_coef", (0.01, 0.1, 1.0), 0.1),
        "rlad": ("alpha", (0.3, 0.5, 0.7), 0.5), "sft": ("lr", (1e-4, 3e-4, 1e-3), None)}
# the same grid size for every method: lr x updates-per-rollout at the default knob, then the knob's other values
TUNE_LR = (3e-5, 1e-4)
TUNE_UPDATES = (1, 2, 4)
SELECTION_RULE = ("per method, the setting with the best mean tuning-eval accuracy over the last two evals of its "
                  "tuning run (steps 75 and 100); ties go to the smaller lr x updates-per-rollout. First lr x updates "
                  "at the method's default knob, then the knob's other values at the chosen lr x updates (SFT "
                  "distillation: lr 3e-4 and 1e-3 at the chosen updates). Written before the grid ran.")
# the per-step metrics averaged per method (metric key -> report label)
DIAGNOSTICS = {
    "rollout/reward_mean": "train reward (T=1)",
    "rollout/zero_adv_group_frac": "zero-adv. groups",
    "actor/ratio_mean": "mean ratio r",
    "actor/clip_frac_low": "clip low",
    "actor/clip_frac_high": "clip high",
    "actor/teacher_clamp_frac": "teacher clamp",
    "actor/log_ratio_teacher_mean": "log pi_S/pi_T",
    "actor/kl_teacher": "KL(S‖T) k2",
    "actor/entropy": "entropy",
}


@dataclass(frozen=True)
class Setting:
    """One run's method and hyper-parameters (what the tuning grid varies)."""

    method: str
    lr: float = 1e-4
    num_updates: int = 1
    knob: float | None = None  # the method's KNOB value (None: its default; SFT: unused)

    @property
    def knob_value(self) -> float | None:
        name, _, default = KNOB[self.method]
        return self.lr if name == "lr" else (default if self.knob is None else self.knob)

    @property
    def name(self) -> str:
        knob = "" if KNOB[self.method][0] == "lr" else f"_{KNOB[self.method][0]}{self.knob_value:g}"
        return f"{self.method}_lr{self.lr:g}_u{self.num_updates}{knob}"


@dataclass
class Recipe:
    """Every knob of the comparison that is not tuned."""

    teacher_iters: int = 4000  # cosine 3e-3 -> 3e-4
    student_iters: int = 1250  # constant 3e-3
    sft_batch: int = 64  # traces per SFT step
    tune_iters: int = 100
    rl_iters: int = 150
    rollout_batch_size: int = 8  # prompts per step
    n_samples: int = 8  # samples per prompt (SFT distillation: sequences per step = the same 64)
    micro_batch_size: int = 32
    lr_warmup_steps: int = 10
    max_response_len: int = 60
    eval_interval: int = 25
    eval_size: int = 512
    eval_seed: int = 1234  # held-out splits `eval` (final) and `tune` of this seed
    final_seeds: tuple[int, ...] = FINAL_SEEDS
    methods: tuple[str, ...] = METHODS
    lanes: int = 2  # single-rank runs side by side
    final_k: int = 8
    final_temperature: float = 0.6
    final_top_p: float = 0.95
    tune_lr: tuple[float, ...] = TUNE_LR
    tune_updates: tuple[int, ...] = TUNE_UPDATES
    tune_knobs: bool = True  # stage 2 of the grid (the knob's other values)
    task_config: tuple[str, ...] = TASK_CONFIG

    def check(self) -> None:
        for n in (self.rl_iters, self.tune_iters):
            if n % self.eval_interval or n < 2 * self.eval_interval:
                raise ValueError(f"iterations {n} must be a multiple of eval_interval {self.eval_interval} (>= 2 evals)")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")


# --quick: 2-digit sums of 2 terms (a 300-step teacher solves some, so every method has something to learn from)
QUICK = dict(task_config=("min_digits=2", "max_digits=2", "min_terms=2", "max_terms=2"), teacher_iters=300,
             student_iters=250, tune_iters=4, rl_iters=4, eval_interval=2, eval_size=32,
             final_seeds=(110_000_000, 120_000_000), final_k=2, tune_lr=(1e-4,), tune_updates=(1,),
             tune_knobs=False, lr_warmup_steps=2)


def tuning_grid(method: str, r: Recipe) -> list[Setting]:
    """Stage 1 of the grid for `method`: lr x updates at the default knob (the same size for every method)."""
    return [Setting(method, lr, u) for lr in r.tune_lr for u in r.tune_updates]


def knob_grid(best: Setting) -> list[Setting]:
    """Stage 2: the knob's other values at the chosen lr x updates."""
    name, values, default = KNOB[best.method]
    if name == "lr":
        return [Setting(best.method, v, best.num_updates) for v in values if v != best.lr]
    return [Setting(best.method, best.lr, best.num_updates, v) for v in values if v != default]


def select(scores: dict[Setting, float]) -> Setting:
    """`SELECTION_RULE`: the best score; ties to the smaller lr x updates."""
    return max(scores, key=lambda s: (round(scores[s], 9), -s.lr * s.num_updates))


# ------------------------------------------------------------------------------------------------ commands


def sft_prompts(r: Recipe, iters: int) -> int:
    """`--train-size` of an SFT run: each prompt's trace is seen once."""
    return iters * r.sft_batch


def rl_prompts(r: Recipe, iters: int) -> int:
    """`--train-size` of an RL run: each prompt is drawn once."""
    return iters * r.rollout_batch_size


def training_sets(r: Recipe) -> dict[str, tuple[int, int]]:
    """Every training prompt set of the comparison, name -> (`--train-size`, `--seed`), as the commands draw them
    (the held-out check regenerates exactly these)."""
    return {"teacher SFT": (sft_prompts(r, r.teacher_iters), TEACHER_SEED),
            "student SFT": (sft_prompts(r, r.student_iters), STUDENT_SEED),
            "tuning RL": (rl_prompts(r, r.tune_iters), TUNE_SEED),
            **{f"final RL seed {seed}": (rl_prompts(r, r.rl_iters), seed) for seed in r.final_seeds}}


def task_flags(r: Recipe) -> list[str]:
    return [x for c in r.task_config for x in ("--task-config", c)]


def pair_commands(out: Path, r: Recipe, py: str = "python") -> list[tuple[str, list[str], Path]]:
    """(name, argv, the dir it produces) for the pair: random tiny Qwen2 models over the char tokenizer, then SFT on
    column-addition traces (teacher d=64 long, student d=32 short)."""
    common = ["--prompt-data", "builtin:addition", "--eval-data", "builtin:addition", *task_flags(r),
              "--eval-size", str(r.eval_size), "--eval-seed", str(r.eval_seed), "--no-chat-template",
              "--max-response-len", str(r.max_response_len)]
    sft = ["--algo", "sft", "--sft-source", "dataset", "--rollout-batch-size", str(r.sft_batch),
           "--n-samples-per-prompt", "1", "--micro-batch-size", str(r.sft_batch), "--lr", "3e-3",
           "--lr-warmup-steps", "20"]

    def sft_run(who: str, iters: int, seed: int, schedule: list[str]) -> list[str]:
        return [py, "-m", "rlad_megatron.train", *common, *sft, "--student-hf", str(out / f"{who}_init"),
                "--train-size", str(sft_prompts(r, iters)), "--train-iters", str(iters), *schedule,
                "--eval-interval", str(max(iters // 4, 1)), "--seed", str(seed),
                "--output-dir", str(out / f"sft_{who}"), "--save-hf", str(out / who)]

    return [
        ("make_teacher", [py, "tools/make_tiny_model.py", "--out", str(out / "teacher_init"), "--size", "teacher",
                          "--seed", "1"], out / "teacher_init"),
        ("make_student", [py, "tools/make_tiny_model.py", "--out", str(out / "student_init"), "--size", "student",
                          "--seed", "2"], out / "student_init"),
        ("sft_teacher", sft_run("teacher", r.teacher_iters, TEACHER_SEED,
                                ["--min-lr", "3e-4", "--lr-decay-style", "cosine"]), out / "teacher"),
        ("sft_student", sft_run("student", r.student_iters, STUDENT_SEED, []), out / "student"),
    ]


def method_flags(s: Setting, teacher: Path) -> list[str]:
    if s.method == "grpo":
        return ["--algo", "grpo"] + (["--ref-kl-coef", f"{s.knob_value:g}", "--kl-estimator", "k2"]
                                     if s.knob_value else [])
    if s.method == "kdrl":
        return ["--algo", "kdrl", "--teacher-hf", str(teacher), "--kl-coef", f"{s.knob_value:g}",
                "--kl-estimator", "k2"]
    if s.method == "rlad":
        return ["--algo", "rlad", "--teacher-hf", str(teacher), "--alpha", f"{s.knob_value:g}"]
    if s.method == "sft":
        return ["--algo", "sft", "--sft-source", "teacher", "--teacher-hf", str(teacher)]
    raise ValueError(s.method)


def rl_command(s: Setting, seed: int, iters: int, split: str, d: Path, r: Recipe, pair: Path,
               py: str = "python") -> list[str]:
    """One single-rank training run on the student; everything but `s` is shared by all methods."""
    return [py, "-m", "rlad_megatron.train",
            "--prompt-data", "builtin:addition", "--eval-data", "builtin:addition", *task_flags(r),
            "--no-chat-template", "--max-response-len", str(r.max_response_len),
            "--train-size", str(rl_prompts(r, iters)), "--eval-size", str(r.eval_size),
            "--eval-seed", str(r.eval_seed), "--eval-split", split,
            "--student-hf", str(pair / "student"), *method_flags(s, pair / "teacher"),
            "--rollout-batch-size", str(r.rollout_batch_size), "--n-samples-per-prompt", str(r.n_samples),
            "--micro-batch-size", str(r.micro_batch_size), "--num-updates-per-rollout", str(s.num_updates),
            "--lr", f"{s.lr:g}", "--lr-warmup-steps", str(r.lr_warmup_steps), "--train-iters", str(iters),
            "--eval-interval", str(r.eval_interval), "--seed", str(seed),
            "--output-dir", str(d), "--save-hf", str(d / "student_hf")]


def eval_argv(model: Path, out_json: Path, r: Recipe) -> list[str]:
    """rlad-eval of one model on the final held-out set, k samples at the paper's eval sampling."""
    return ["--model", str(model), "--data", "builtin:addition", *task_flags(r), "--size", str(r.eval_size),
            "--seed", str(r.eval_seed), "--k", str(r.final_k), "--temperature", str(r.final_temperature),
            "--top-p", str(r.final_top_p), "--max-new-tokens", str(r.max_response_len), "--no-chat-template",
            "--quiet", "--output-json", str(out_json)]
