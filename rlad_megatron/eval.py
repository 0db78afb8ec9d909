"""`rlad-eval`: Mean@k and unbiased Pass@k of a checkpoint on JSONL/Parquet benchmarks or reasoning-gym sets.

    rlad-eval --model outputs/tiny/rlad_student --data builtin:addition --size 256 --k 8 \\
        --temperature 0.6 --top-p 0.95 --max-new-tokens 60 --no-chat-template --output-json eval.json
    rlad-eval --model Qwen3-0.6B --data builtin:knights_knaves --task-config n_people=2,3,4,5,6,7,8 --size 100 --k 8
    rlad-eval --model ckpt/q06 --tokenizer Qwen3-0.6B --data aime24.jsonl --k 32 --reward math

`--model` is a Hugging Face model dir (config.json + weights), a model-only Megatron checkpoint
(`tools/convert_hf_to_megatron.py` output, `rlad_meta.json` with `version`), or a training checkpoint
(`rlad-train --save` dir or one of its `iter_*` dirs; see `model_source`). Megatron checkpoints are built at TP=1 in this
process (`platform.init()`, a 1-rank gloo/nccl group), loaded, and exported through the weight-sync path
(`export_hf_weights` -> `push_weights`) into the same in-process HF engine; they need `--tokenizer`.

`--data` (repeatable) takes the forms of `rlad-train --prompt-data`: a JSONL/Parquet file (rows `prompt` or
`messages`, `answer`, `task`, optional `subset`) or `builtin:<task>`. Builtin sets are drawn from the
held-out split `--split` (`eval`, or `tune` for a tuning set; generator seed `--seed + 10**9` / `+ 2 * 10**9`; a
prompt belongs to one split by a hash of its text, so no training set of any seed contains it, `data.partition`);
`--seed` defaults to `rlad-train --eval-seed`'s default, so the same flags give the trainer's held-out set.
`--task-config key=v1,v2,...` sweeps a generator knob: one set of `--size` items per value, each its own
subset (e.g. K&K by number of people). Subsets otherwise come from `evaluation.subset_of` (a `subset`
column, a difficulty knob, the addition task's number of terms) or `--subset-key`.

Each prompt gets `--k` samples (`--temperature`, `--top-p`, `--top-k`; `--temperature 0` is greedy). Scores
come from the training reward code (`rlad_megatron.rewards`, the task's reward unless `--reward`); a sample
is correct when its score is >= 1. Reported per benchmark and subset: `mean@k` (mean Pass@1 over the k
samples, RLAD's Mean@k) and the unbiased `pass@j` (Chen et al. 2021) for every j in `--pass-k`.
Output: a Markdown table on stdout, `--output-json`, `--output-md`, and optionally every sample (`--save-samples`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from rlad_megatron.data.loader import load_prompts, parse_task_config
from rlad_megatron.errors import UserError, as_user_error, run_cli
from rlad_megatron.evaluation import subset_of, summarize
from rlad_megatron.model_source import model_format
from rlad_megatron.rewards import DEFAULT_TIMEOUT_S
from rlad_megatron.rollout.base import SamplingParams
from rlad_megatron.rollout.generate import RewardSpec, generate_and_score, per_prompt

DEFAULT_SEED = 1234  # = rlad-train --eval-seed default: the same builtin held-out set as training evals


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlad-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="HF model dir, model-only Megatron checkpoint, or training checkpoint")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model; required for Megatron dirs)")
    g.add_argument("--bf16", action="store_true", help="run the engine in bf16 (default fp32)")
    g.add_argument("--device", default="cpu", help="engine device (cpu, cuda)")

    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True,
                   help="JSONL/Parquet file or builtin:<task> (repeatable)")
    g.add_argument("--size", type=int, default=256, help="items per builtin set (per --task-config value)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts of each file")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="builtin sets: held-out split of this seed (generator seed + 1e9); = rlad-train --eval-seed")
    g.add_argument("--split", default="eval", choices=("eval", "tune"),
                   help="builtin sets: the held-out split (tune: the tuning set, disjoint from eval and training)")
    g.add_argument("--task-config", action="append", default=[], metavar="KEY=V[,V...]",
                   help="builtin generator config; a comma list sweeps the knob, one subset per value")
    g.add_argument("--subset-key", default=None, help="group by this meta / generator-config key")
    g.add_argument("--no-chat-template", dest="apply_chat_template", action="store_false")

    g = p.add_argument_group("sampling and scoring")
    g.add_argument("--k", type=int, default=8, help="samples per prompt (Mean@k)")
    g.add_argument("--pass-k", type=int, nargs="*", default=None,
                   help="Pass@j for these j <= k (default: 1, powers of two below k, and k)")
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--stop", nargs="*", default=[], help="stop strings")
    g.add_argument("--sample-seed", type=int, default=0, help="sampling seed (sequence j uses seed + j)")
    g.add_argument("--batch-size", type=int, default=1024, help="sequences per engine.generate call")
    g.add_argument("--reward", default=None, help="reward registry name or module:function (default: the task's)")
    g.add_argument("--format-reward", type=float, default=0.0,
                   help="as in training; a sample counts as correct only at score >= 1")
    g.add_argument("--reward-workers", type=int, default=0)
    g.add_argument("--reward-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds one sample's reward may take; slower ones score 0 (0 = no limit)")

    g = p.add_argument_group("output")
    g.add_argument("--output-json", default=None)
    g.add_argument("--output-md", default=None)
    g.add_argument("--save-samples", default=None, help="JSONL of every prompt with its samples and scores")
    g.add_argument("--quiet", action="store_true", help="no table on stdout")
    return p


def default_pass_ks(k: int) -> list[int]:
    return sorted({1, k, *(2**i for i in range(1, k.bit_length()) if 2**i < k)})


# ------------------------------------------------------------------------------------------------ data


def benchmark_name(source: str, taken: set[str]) -> str:
    base = source.split(":", 1)[1] if source.startswith("builtin:") else Path(source).stem
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# ------------------------------------------------------------------------------------------------ model


def load_engine(model_path: str, *, tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0):
    """An `HFEngine` holding the model at `model_path` (any format of `model_format`) -> (engine, format)."""
    from rlad_megatron.rollout.hf_engine import HFEngine

    fmt = model_format(model_path)
    if fmt == "hf":
        return HFEngine(model_path, dtype=dtype, device=device, seed=seed, tokenizer=tokenizer), fmt
    from transformers import AutoConfig

    from rlad_megatron import platform
    from rlad_megatron.convert import export_hf_weights
    from rlad_megatron.model_source import build_megatron, inspect_megatron
    from rlad_megatron.rollout.weight_sync import push_weights

    source = inspect_megatron(model_path, flag="--model")  # files only: a broken checkpoint fails before init
    platform.init(platform.Layout(), seed=seed)  # one rank: TP = PP = 1
    try:
        model = build_megatron(source, dtype)
        config = AutoConfig.for_model(**{k: v for k, v in source.hf_config.items() if k != "transformers_version"})
        engine = HFEngine(config, dtype=dtype, device=device, seed=seed, tokenizer=tokenizer)
        push_weights(engine, export_hf_weights(model), version=source.label)
    finally:
        platform.shutdown()
    return engine, fmt


# ------------------------------------------------------------------------------------------------ report


def markdown_table(result: dict) -> str:
    """One row per benchmark x subset: prompts, mean@k, pass@j."""
    s = result["settings"]
    metric_keys = [f"mean@{s['k']}", *(f"pass@{j}" for j in s["pass_k"])]
    lines = [(f"**{result['model']}** ({result['model_format']}); k={s['k']} samples/prompt, "
             f"temperature {s['temperature']}, top-p {s['top_p']}, max {s['max_new_tokens']} new tokens"),
             "",
             "| benchmark | subset | prompts | " + " | ".join(metric_keys) + " |",
             "|---|---|---:|" + "---:|" * len(metric_keys)]
    for name, bench in result["benchmarks"].items():
        for subset, m in bench["metrics"].items():
            cells = " | ".join(f"{m[key]:.3f}" for key in metric_keys)
            lines.append(f"| {name} | {subset} | {int(m['prompts'])} | {cells} |")
    return "\n".join(lines) + "\n"


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def check_flags(args: argparse.Namespace) -> list[int]:
    """Flag checks that need no file; returns the Pass@j list."""
    if args.k < 1:
        raise UserError(f"--k {args.k}: must be >= 1")
    pass_ks = sorted(set(args.pass_k)) if args.pass_k else default_pass_ks(args.k)
    if any(not 1 <= j <= args.k for j in pass_ks):
        raise UserError(f"--pass-k {' '.join(map(str, pass_ks))}: values must be in [1, --k={args.k}]")
    if args.reward_timeout < 0:
        raise UserError(f"--reward-timeout {args.reward_timeout}: must be >= 0 seconds (0 = no limit)")
    return pass_ks


def _reward_of(src: str, samples: list, reward: str | None, format_reward: float) -> str:
    """The benchmark's reward name, resolved now (an unknown name fails before the model is built)."""
    from rlad_megatron.rewards import get_reward_fn

    name = reward or samples[0].task
    if not name:
        raise UserError(f"--data {src}: rows carry no 'task' name; pass --reward")
    with as_user_error(flag=f"--reward {name}:" if reward else f"--data {src}: task {name!r}:"):
        get_reward_fn(name, format_reward=format_reward)
    return name


def run(args: argparse.Namespace) -> dict:
    """Evaluate; every input is validated from files and flags before the model is built."""
    from rlad_megatron.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    pass_ks = check_flags(args)
    fmt = model_format(args.model)
    tok_dir = args.tokenizer or (args.model if fmt == "hf" else None)
    if tok_dir is None:
        raise UserError(f"--model {args.model}: a Megatron checkpoint ({fmt}) has no tokenizer; pass --tokenizer DIR")
    tokenizer = load_tokenizer(tok_dir, flag="--tokenizer" if args.tokenizer else "--model")
    if fmt != "hf":
        from rlad_megatron.model_source import inspect_megatron

        inspect_megatron(args.model, flag="--model")
    configs = parse_task_config(args.task_config)
    taken: set[str] = set()
    benches = []
    for src in args.data:
        with as_user_error(flag="--data"):
            samples = load_prompts(src, split=args.split, size=args.size, seed=args.seed, configs=configs,
                                   tokenizer=tokenizer, apply_chat_template=args.apply_chat_template, limit=args.limit)
        benches.append((benchmark_name(src, taken), src, samples,
                        _reward_of(src, samples, args.reward, args.format_reward)))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    engine, fmt = load_engine(args.model, tokenizer=tokenizer, dtype=dtype, device=args.device, seed=args.sample_seed)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), seed=args.sample_seed)
    result = {
        "model": str(args.model), "model_format": fmt,
        "settings": {"k": args.k, "pass_k": pass_ks, "temperature": args.temperature, "top_p": args.top_p,
                     "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                     "split": args.split, "sample_seed": args.sample_seed, "size": args.size, "task_config": args.task_config,
                     "chat_template": args.apply_chat_template, "format_reward": args.format_reward},
        "benchmarks": {},
    }
    dump = open(args.save_samples, "w", encoding="utf-8") if args.save_samples else None  # noqa: SIM115
    try:
        for name, src, samples, reward in benches:
            tb = time.perf_counter()
            rollouts, scores = generate_and_score(
                engine, samples, n=args.k, sampling=sampling, tokenizer=tokenizer, batch_size=args.batch_size,
                reward=RewardSpec(reward, workers=args.reward_workers, format_reward=args.format_reward,
                                  timeout=args.reward_timeout))
            scores, texts = per_prompt(scores, args.k), per_prompt([r.text for r in rollouts], args.k)
            subsets = [subset_of(s, args.subset_key) for s in samples]
            result["benchmarks"][name] = {"source": src, "reward": reward,
                                          "metrics": summarize(scores, subsets, pass_ks),
                                          "seconds": time.perf_counter() - tb}
            if dump:
                for s, sub, sc, tx in zip(samples, subsets, scores, texts, strict=True):
                    prompt = s.prompt if isinstance(s.prompt, str) else s.prompt[-1]["content"]
                    dump.write(json.dumps({"benchmark": name, "subset": sub, "prompt": prompt, "answer": s.answer,
                                           "scores": sc, "responses": tx}) + "\n")
    finally:
        if dump:
            dump.close()
    result["seconds"] = time.perf_counter() - t0
    _write(args.output_json, json.dumps(result, indent=2) + "\n")
    _write(args.output_md, markdown_table(result))
    return result


def _main(argv: list[str]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = build_parser().parse_args(argv)
    result = run(args)
    if not args.quiet:
        print(markdown_table(result), end="", flush=True)


def main(argv: list[str] | None = None) -> None:
    """`rlad-eval`: bad input is one line on stderr and exit code 2 (`errors.run_cli`)."""
    run_cli("rlad-eval", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
