"""`rlad-train` / `python -m rlad_megatron.train`: launched by torchrun (one process per GPU or CPU rank).

Every input is validated from files and flags first (`preflight.check_train_inputs`); bad input is one line on
stderr (`rlad-train: error: <flag/file>: ...`) and exit code 2 on every rank (`errors.run_cli`).
"""

from __future__ import annotations

import sys

from rlad_megatron import platform
from rlad_megatron.arguments import parse_args
from rlad_megatron.errors import as_user_error, global_rank, run_cli


def _main(argv: list[str]) -> None:
    with as_user_error(ValueError):  # arguments.validate: cross-flag checks
        args = parse_args(argv)
    if args.dry_run:
        from rlad_megatron.dry_run import dry_run

        with as_user_error(ValueError):
            dry_run(args)
        return
    from rlad_megatron.preflight import check_train_inputs

    for note in check_train_inputs(args):
        if global_rank() == 0:
            print(f"rlad-train: {note}", flush=True)
    from rlad_megatron.trainer import train

    platform.init(platform.Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                  cp=args.context_parallel_size), seed=args.seed,
                  timeout_minutes=args.distributed_timeout_minutes)
    try:
        final = train(args)
        if platform.is_rank0() and final:
            print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()), flush=True)
    finally:
        platform.shutdown()


def main(argv: list[str] | None = None) -> None:
    run_cli("rlad-train", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main(sys.argv[1:])
