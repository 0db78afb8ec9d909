"""SGLang rollout engines from the flags: `--rollout-engine sglang` (colocated, one engine per
`--rollout-num-gpus-per-engine` ranks) and `sglang-remote` (servers behind `--sglang-router-url` and/or at
`--sglang-server-url`), plus this engine's own flags.

Remote: every rank is a generation client (it takes chunks from the job's shared queue, sends one request per
sample, detokenises and scores its samples), so request handling and reward scoring are spread over the job
instead of queueing in one process; only rank 0 pushes weights (one `update_weights_from_distributed` group with
every server) and manages the servers' memory, and the other ranks wait for its push before they generate.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlad_megatron.rollout.sglang.args import sglang_kwargs_from_args
from rlad_megatron.rollout.sglang.engine import SGLangEngine
from rlad_megatron.rollout.sglang.engine_ranks import EngineRanks, WeightPeer


def make_sglang_engine(args, model_dir: str | os.PathLike | None = None, *, rank: int = 0, tp_size: int = 1,
                       ranks: EngineRanks | None = None) -> SGLangEngine:
    """This rank's engine. Colocated (on an engine leader): an `sglang.Engine` with `tp_size` =
    `--rollout-num-gpus-per-engine` on its ranks' GPUs, started from `load_format="dummy"` (real weights arrive
    through the first sync) in the training dtype; `--sglang-*` flags override any default. Remote: a client of the
    servers; it pushes weights only on rank 0. `--rollout-fp8`: block-FP8 weights pushed to an engine whose model
    dir carries an FP8 `quantization_config` (`fp8_weights.prepare_fp8_model_dir`)."""
    kwargs = sglang_kwargs_from_args(args)
    remote = getattr(args, "rollout_engine", "sglang") == "sglang-remote"
    fp8_block = None
    if getattr(args, "rollout_fp8", False):
        from rlad_megatron.rollout.sglang.fp8_weights import prepare_fp8_model_dir

        fp8_block = tuple(getattr(args, "rollout_fp8_block", (128, 128)))
        if model_dir is not None and not remote:  # remote servers load their own model dir
            model_dir = prepare_fp8_model_dir(
                model_dir, Path(getattr(args, "output_dir", ".")) / f"sglang_fp8_model_rank{rank}", block=fp8_block)
    inflight = getattr(args, "rollout_max_inflight", 64)
    if remote:
        urls, router = list(getattr(args, "sglang_server_url", None) or []), getattr(args, "sglang_router_url", None)
        if not urls and not router:
            raise ValueError("--rollout-engine sglang-remote needs --sglang-router-url URL and/or one or more "
                             "--sglang-server-url URL")
        return SGLangEngine.remote(urls, router_url=router, sync_backend=getattr(args, "rollout_sync_backend", None),
                                   update_timeout_s=getattr(args, "rollout_update_timeout", 300.0),
                                   model_path=model_dir, fp8_block=fp8_block, concurrency=inflight,
                                   max_requests=getattr(args, "rollout_max_requests", 512), receives_weights=rank == 0)
    if model_dir is None:
        raise ValueError("--rollout-engine sglang needs a model dir (--student-hf or --tokenizer) for its config")
    if int(kwargs.get("tp_size", tp_size)) != tp_size:
        raise ValueError(f"--sglang-tp-size {kwargs['tp_size']} disagrees with --rollout-num-gpus-per-engine "
                         f"{tp_size} (the colocated engine's TP size); set only the latter")
    defaults = {"load_format": "dummy", "random_seed": getattr(args, "seed", 0),
                "dtype": "bfloat16" if getattr(args, "bf16", False) else "float32"}
    if getattr(args, "rollout_stop", None):
        defaults["skip_tokenizer_init"] = False  # stop strings need the engine's tokenizer
    return SGLangEngine.colocated(model_dir, server_kwargs={**defaults, **kwargs}, tp_size=tp_size, ranks=ranks,
                                  fp8_block=fp8_block, concurrency=inflight)


def make_weight_peer(ranks: EngineRanks | None) -> WeightPeer | None:
    """What a non-leader rank of a TP > 1 colocated engine pushes its weights into (None elsewhere)."""
    return WeightPeer(ranks) if ranks is not None and not ranks.is_leader else None


def add_rollout_engine_args(parser) -> None:
    """This engine's own flags (not SGLang server args). Defined before the `--sglang-*` pass-through, so the two
    `--sglang-...-url` flags stay the project's."""
    g = parser.add_argument_group("SGLang rollout engine")
    g.add_argument("--sglang-router-url", "--rollout-router-url", dest="sglang_router_url", default=None,
                   help="sglang-router in front of the remote servers: generation goes through it, weight updates "
                        "to every worker (its /workers unless --sglang-server-url lists them)")
    g.add_argument("--sglang-server-url", "--sglang-urls", dest="sglang_server_url", nargs="+", action="extend",
                   default=[], help="remote SGLang server(s), repeatable; without a router, requests go to the "
                                    "server with the fewest outstanding")
    g.add_argument("--rollout-max-inflight", type=int, default=64,
                   help="generate calls (chunks of --rollout-chunk-groups prompt groups) in flight per engine "
                        "(colocated) or per rank (remote); SGLang batches them continuously")
    g.add_argument("--rollout-max-requests", type=int, default=512,
                   help="remote: HTTP requests (one per sample) in flight per rank")
    g.add_argument("--rollout-sync-backend", choices=["nccl", "gloo"], default=None,
                   help="remote weight broadcast backend (default: nccl with CUDA, gloo without)")
    g.add_argument("--rollout-update-timeout", type=float, default=300.0, help="seconds per weight-update call")
