"""Data-parallel rollouts in the loop, one torchrun launch (2 ranks):

* `one_engine` / `two_engines`: the same 2-step GRPO run with 1 engine (`--rollout-num-gpus-per-engine 2`) and with
  2 engines (one per rank); every step's rollouts are saved (`--save-rollouts`) for the test to compare;
* `released_weights`: an engine that throws its weights away on release (colocated SGLang without a CPU backup)
  and refuses to generate on anything but the last push, with an eval every step and dynamic sampling whose first
  round has all-equal rewards: 3 steps must run.

argv: <out_dir> <student_hf>. Rank 0 prints `CASE <name> OK engines=<n> pushes=<n>` per case.
"""

import json
import sys
from pathlib import Path

from rlad_megatron import platform
from rlad_megatron.arguments import parse_args
from rlad_megatron.trainer import train

BASE = ["--algo", "grpo", "--prompt-data", "builtin:addition", "--no-chat-template", "--train-size", "64",
        "--max-response-len", "12", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
        "--micro-batch-size", "4", "--lr", "1e-3", "--reward", "tests.loop_rewards:length_parity",
        "--rollout-chunk-groups", "1"]

CASES = {
    "one_engine": ["--train-iters", "2", "--rollout-num-gpus-per-engine", "2"],
    "two_engines": ["--train-iters", "2", "--rollout-num-gpus-per-engine", "1"],
    "released_weights": ["--train-iters", "3", "--rollout-num-gpus-per-engine", "2", "--eval-interval", "1",
                         "--eval-data", "builtin:addition", "--eval-size", "8", "--dynamic-sampling",
                         "--reward", "tests.loop_rewards:all_equal_first_24_calls",
                         "--rollout-engine", "tests.fake_engines:releasing_engine"],
}


def main() -> None:
    out, student = Path(sys.argv[1]), sys.argv[2]
    platform.init_distributed()
    for name, extra in CASES.items():
        run_dir = out / name
        args = parse_args([*BASE, *extra, "--student-hf", student, "--output-dir", str(run_dir),
                           "--save-rollouts", str(run_dir / "rollouts")])
        platform.init(platform.Layout(), seed=args.seed)
        train(args)
        platform.barrier()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "actor/loss" in r]
        assert [r["step"] for r in steps] == list(range(1, args.train_iters + 1)), (name, rows)
        if platform.is_rank0():
            print(f"CASE {name} OK engines={steps[0]['perf/rollout_engines']:.0f} "
                  f"drawn={[r['rollout/groups_drawn'] for r in steps]}", flush=True)
    platform.shutdown()


if __name__ == "__main__":
    main()
