"""Command-line flags: Megatron's names for Megatron's knobs, RLAD flags for the method.

Every field of megatron-core's `TransformerConfig` is also accepted as `--field-name VALUE` and
passed straight through (a flag that isn't given keeps the HF-derived / Megatron default).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses

from rlad_megatron.rewards.scorer import DEFAULT_TIMEOUT_S
from rlad_megatron.step.algos import ALGOS
from rlad_megatron.step.build import TC_PREFIX

ENGINES = ("hf", "sglang", "sglang-remote")
_EXPLICIT_CONFIG_FIELDS = {  # set from dedicated flags or from the HF config, never passed through twice
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size", "bf16", "fp16",
    "params_dtype", "pipeline_dtype", "fp8", "fp8_recipe", "fp8_param",
}


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def _add_transformer_config_passthrough(parser: argparse.ArgumentParser) -> None:
    from megatron.core.transformer import TransformerConfig

    group = parser.add_argument_group(
        "megatron-core TransformerConfig (passed through)",
        "any TransformerConfig field as --field-name VALUE, e.g. --recompute-granularity full, "
        "--attention-backend flash; values are parsed as Python literals")
    taken = {a for action in parser._actions for a in action.option_strings}
    for f in dataclasses.fields(TransformerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name.startswith("_") or f.name in _EXPLICIT_CONFIG_FIELDS or flag in taken or not f.init:
            continue
        group.add_argument(flag, dest=f"{TC_PREFIX}{f.name}", type=_literal, default=argparse.SUPPRESS,
                           metavar="V", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlad-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="RL with teacher distillation (GRPO / RLAD-TRRD / KDRL / GKD / SFT) on Megatron-core.")

    g = p.add_argument_group("models")
    g.add_argument("--student-hf", help="student Hugging Face dir (config, tokenizer, weights)")
    g.add_argument("--student-load", help="student Megatron checkpoint (tools/convert_hf_to_megatron.py output)")
    g.add_argument("--teacher-hf", help="teacher Hugging Face dir")
    g.add_argument("--teacher-load", help="teacher Megatron checkpoint")
    g.add_argument("--tokenizer", help="tokenizer dir (default: --student-hf)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("parallelism (student: Megatron's global state; teacher: its own groups)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--teacher-tensor-model-parallel-size", type=int, default=None, help="default: student's")
    g.add_argument("--teacher-pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-timeout-minutes", type=float, default=30.0,
                   help="no rank waits longer than this for the others (process groups, rollout barrier)")

    g = p.add_argument_group("training")
    g.add_argument("--algo", choices=sorted(ALGOS), default="rlad")
    g.add_argument("--train-iters", type=int, default=10, help="RL steps (rollout + update rounds)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="rows per micro-batch (padded batches)")
    g.add_argument("--use-dynamic-batch-size", action="store_true",
                   help="pack whole sequences into micro-batches of at most --max-tokens-per-gpu tokens, balanced "
                        "over the DP ranks by tokens (scoring and update); no compute on padding")
    g.add_argument("--max-tokens-per-gpu", type=int, default=None, help="token budget of one packed micro-batch")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step (default: rollout batch / --num-updates-per-rollout)")
    g.add_argument("--num-updates-per-rollout", type=int, default=1)
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="in optimizer steps")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("RLAD / TRRD and baselines")
    g.add_argument("--alpha", type=float, default=0.5, help="TRRD: weight of pi_old in the anchor; 1 = GRPO")
    g.add_argument("--eps-clip-low", type=float, default=0.2)
    g.add_argument("--eps-clip-high", type=float, default=0.28)
    g.add_argument("--dual-clip", type=float, default=None, help="dual-clip constant c > 1 for A < 0")
    g.add_argument("--teacher-clamp", type=float, default=1.0, help="|log pi_S - log pi_T| clamp (App. B)")
    g.add_argument("--loss-agg", choices=["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"],
                   default="seq-mean-token-mean")
    g.add_argument("--kl-coef", type=float, default=1e-3, help="KDRL: weight of KL(student || teacher)")
    g.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default="k2",
                   help="KL estimator of every KL loss term (KDRL, --ref-kl-coef): k2 = reverse-KL gradient, k3 = "
                        "forward-KL gradient; k1 is refused (zero expected gradient, see losses/kl.py)")
    g.add_argument("--ref-kl-coef", type=float, default=0.0,
                   help="beta * KL(student || initial student), grpo/rlad (a frozen copy of the initial student)")
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--gkd-divergence", choices=["forward", "reverse", "jsd"], default="reverse")
    g.add_argument("--gkd-rl-coef", type=float, default=0.0, help="GKD: add this times the GRPO surrogate")
    g.add_argument("--tis-cap", type=float, default=None, help="truncated importance sampling cap C")
    g.add_argument("--dynamic-sampling", action="store_true", help="drop zero-variance groups, draw more")
    g.add_argument("--max-sampling-rounds", type=int, default=4)
    g.add_argument("--sft-source", choices=["teacher", "dataset"], default="teacher",
                   help="sft: rejection-sampled teacher traces, or the dataset's reference responses")

    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-engine", default="hf",
                   help="hf | sglang | sglang-remote | module.path:factory (factory(args, spec, tokenizer) -> engine)")
    g.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per step")
    g.add_argument("--rollout-num-gpus-per-engine", type=int, default=1,
                   help="GPUs (ranks) per colocated rollout engine = its TP size; engines = world / this")
    g.add_argument("--rollout-chunk-groups", type=int, default=0,
                   help="prompt groups (x n samples) per engine request; engines take requests as they free up "
                        "(0: auto: 1 group per request for SGLang, which batches requests in flight; 1 request "
                        "per engine and call for the static-batch HF engine)")
    g.add_argument("--save-rollouts", default=None, help="write every step's rollouts as JSONL here (rank 0)")
    g.add_argument("--n-samples-per-prompt", type=int, default=8)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--max-response-len", type=int, default=256)
    g.add_argument("--rollout-stop", nargs="*", default=[])
    g.add_argument("--rollout-stop-token-ids", type=int, nargs="*", default=[])
    g.add_argument("--update-weight-buffer-size", type=int, default=512 * 2**20, help="bytes per bucket")
    g.add_argument("--check-weight-sync", action="store_true", help="engine vs Megatron log-probs after each sync")

    g = p.add_argument_group("data and rewards")
    g.add_argument("--prompt-data", required=False, default=None,
                   help="JSONL/Parquet file, or builtin:<task> (addition, knights_knaves, countdown, chain_sum, ...)")
    g.add_argument("--eval-data", default=None, help="same forms as --prompt-data")
    g.add_argument("--train-size", type=int, default=100_000, help="items of a builtin task for training")
    g.add_argument("--eval-size", type=int, default=256)
    g.add_argument("--eval-seed", type=int, default=1234,
                   help="builtin eval sets are drawn from seed + 1e9: the same held-out set for every --seed")
    g.add_argument("--eval-split", default="eval", choices=("eval", "tune"),
                   help="builtin eval sets: the held-out split (tune: a tuning set, disjoint from eval and training)")
    g.add_argument("--task-config", action="append", default=[], metavar="KEY=V[,V...]",
                   help="builtin generator config of --prompt-data and --eval-data (e.g. min_digits=4); a comma "
                        "list sweeps the knob: one set of --train-size / --eval-size items per value")
    g.add_argument("--no-chat-template", dest="apply_chat_template", action="store_false")
    g.add_argument("--reward", default=None, help="registry name or module.path:function (default: the task's)")
    g.add_argument("--format-reward", type=float, default=0.0)
    g.add_argument("--reward-workers", type=int, default=0, help="process pool size (0 = inline)")
    g.add_argument("--reward-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds one sample's reward may take; slower ones score 0 and are counted (0 = no limit)")

    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-temperature", type=float, default=0.0)
    g.add_argument("--eval-samples", type=int, default=1, help="k samples per eval prompt")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None, help="resume from this training checkpoint dir")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--save-hf", default=None, help="export the final student as a Hugging Face dir")
    g.add_argument("--output-dir", default="outputs/run")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--dry-run", action="store_true", help="validate flags and inputs, build nothing, exit")

    from rlad_megatron.fp8 import add_fp8_args
    from rlad_megatron.rollout.sglang.args import add_sglang_args
    from rlad_megatron.rollout.sglang.factory import add_rollout_engine_args

    add_fp8_args(p)
    add_rollout_engine_args(p)
    add_sglang_args(p)
    _add_transformer_config_passthrough(p)
    return p


def validate(args: argparse.Namespace) -> None:
    """Cross-flag checks that argparse can't express. Raises ValueError naming the flag."""
    if not (args.student_hf or args.student_load):
        raise ValueError("one of --student-hf / --student-load is required")
    if args.rollout_engine not in ENGINES and ":" not in args.rollout_engine:
        raise ValueError(f"--rollout-engine {args.rollout_engine!r}: expected one of {ENGINES} or module.path:factory")
    if ALGOS[args.algo].needs_teacher(args.sft_source) and not (args.teacher_hf or args.teacher_load):
        raise ValueError(f"--algo {args.algo} needs a teacher: --teacher-hf or --teacher-load")
    if args.context_parallel_size > 1:
        raise ValueError("--context-parallel-size > 1: Megatron's CP groups are set up, but the RL loop does not "
                         "split sequences across CP ranks yet; use TP/PP/DP")
    uses_kl = args.algo == "kdrl" or args.ref_kl_coef > 0
    if uses_kl and args.kl_estimator == "k1":
        raise ValueError("--kl-estimator k1 cannot drive a KL loss term: its gradient is zero in expectation over the "
                         "sampled tokens; use k2 (reverse-KL gradient, default) or k3 (forward-KL gradient)")
    if args.ref_kl_coef and args.algo not in ("grpo", "rlad"):
        raise ValueError(f"--ref-kl-coef applies to --algo grpo/rlad, not {args.algo}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.prompt_data is None:
        raise ValueError("--prompt-data is required (a JSONL/Parquet file or builtin:<task>)")
    n = args.rollout_batch_size * args.n_samples_per_prompt
    if n % args.num_updates_per_rollout:
        raise ValueError(f"rollout batch {n} (= --rollout-batch-size x --n-samples-per-prompt) is not divisible "
                         f"by --num-updates-per-rollout {args.num_updates_per_rollout}")
    if args.global_batch_size is not None and args.global_batch_size != n // args.num_updates_per_rollout:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must equal rollout batch {n} / "
                         f"--num-updates-per-rollout {args.num_updates_per_rollout}")
    if args.teacher_tensor_model_parallel_size is None:
        args.teacher_tensor_model_parallel_size = args.tensor_model_parallel_size
    if args.use_dynamic_batch_size:
        if not args.max_tokens_per_gpu or args.max_tokens_per_gpu < 1:
            raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu N (the token budget of a pack)")
        if args.algo == "gkd":
            raise ValueError("--use-dynamic-batch-size: --algo gkd compares full teacher/student logits and keeps "
                             "padded micro-batches")
    if args.rollout_chunk_groups < 0 or args.rollout_num_gpus_per_engine < 1:
        raise ValueError("--rollout-chunk-groups must be >= 0 (0: auto) and --rollout-num-gpus-per-engine >= 1")
    if args.rollout_max_inflight < 1 or args.rollout_max_requests < 1:
        raise ValueError("--rollout-max-inflight and --rollout-max-requests must be >= 1")
    if args.rollout_engine == "sglang-remote" and not (args.sglang_router_url or args.sglang_server_url):
        raise ValueError("--rollout-engine sglang-remote needs --sglang-router-url URL and/or --sglang-server-url URL")
    if args.distributed_timeout_minutes <= 0:
        raise ValueError(f"--distributed-timeout-minutes must be > 0, got {args.distributed_timeout_minutes}")
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    sglang_extra = [a for a in rest if a.startswith("--sglang-")]
    unknown = [a for a in rest if a.startswith("--") and not a.startswith("--sglang-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.sglang_extra = rest if sglang_extra else []
    validate(args)
    return args
