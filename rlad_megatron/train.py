"""`rlad-train` / `python -m rlad_megatron.train`: launched by torchrun (one process per GPU or CPU rank)."""

from __future__ import annotations

import sys

from rlad_megatron import platform
from rlad_megatron.arguments import parse_args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        from rlad_megatron.dry_run import dry_run

        dry_run(args)
        return
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


if __name__ == "__main__":
    main(sys.argv[1:])
