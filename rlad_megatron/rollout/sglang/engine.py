"""SGLang rollout engine behind `RolloutEngine`: colocated (in-process `sglang.Engine`) or remote (HTTP servers).

One class, `SGLangEngine`, holds the protocol logic (sampling-param mapping and log-prob triples -> `Rollout` via
`io`, prefill scoring, weight-update sessions, FP8 re-quantisation, restart-once) over one of two transports
(`transport.Transport`): `LocalTransport` (`colocated`, the default on GPU) or `HTTPTransport` (`remote`; servers
this process starts are `server.ServerProcess`). With engine TP > 1 the engine's training ranks take part in every
weight update (`engine_ranks`). The parity check to run after a weight sync is `parity.check_logprob_parity`. Those
modules' public names are re-exported here; `factory` builds engines from the flags.

SGLang >= 0.5.21 refuses weight updates outside `begin_weight_update` / `end_weight_update`; both are sent when the
engine has them (feature-detected), older engines get client-side sessions only. Staged memory (slime):
`release_memory(all)` before training; `resume_memory(["weights"])`, push, `resume_memory(["kv_cache",
"cuda_graph"])`; the cache is flushed once after the update (see `rlad_megatron.offload.to_rollout`).

Importing this module needs neither sglang nor a GPU; building a colocated engine without sglang raises a
`RuntimeError` that says how to install it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from rlad_megatron.rollout.base import (
    GREEDY_EPS,
    MEMORY_TAGS,
    Rollout,
    SamplingParams,
    WeightUpdateError,
    check_score_args,
)
from rlad_megatron.rollout.sglang.colocated import LocalTransport, require_sglang
from rlad_megatron.rollout.sglang.engine_ranks import bucket_digest, check_local_tp, dtype_name
from rlad_megatron.rollout.sglang.io import _tail_logprobs, rollout_from_output, sampling_dict
from rlad_megatron.rollout.sglang.parity import LogprobParityError, check_logprob_parity, tail_logprobs
from rlad_megatron.rollout.sglang.remote import HTTPTransport, init_weight_group
from rlad_megatron.rollout.sglang.server import ServerProcess, wait_until_healthy
from rlad_megatron.rollout.sglang.transport import EngineDiedError, Transport

log = logging.getLogger(__name__)

ALL_TAGS = ("weights", "kv_cache", "cuda_graph")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float32": torch.float32,
           "float": torch.float32}


class SGLangEngine:
    """`RolloutEngine` over SGLang. Build with `SGLangEngine.colocated(...)` or `SGLangEngine.remote(...)`.

    `fp8_block`: push block-FP8 weights (`fp8_weights.quantize_named_tensors`) to an engine launched with an FP8
    `quantization_config`. `on_restart(engine)`: called after the engine died and was restarted once (re-push the
    weights there); without it a restart with non-initial weights raises, since the rollouts would be stale.
    `concurrency`: generate calls a caller may have in flight at once (`dispatch.run_engine` runs that many worker
    threads; the engine batches their requests). `receives_weights=False`: a generation-only client of remote
    servers whose weights another process pushes (weight calls raise). With engine TP > 1 and a colocated
    transport that has `ranks` (`engine_ranks.EngineRanks`), every weight-update step is a collective of the
    engine's training ranks (each contributes its own payload, see `engine_ranks`).
    """

    def __init__(self, transport: Transport, *, vocab_size: int | None = None, update_dtype: torch.dtype | None = None,
                 fp8_block: tuple[int, int] | None = None, weight_version: str = "default",
                 deterministic: bool = False, on_restart: Callable[[SGLangEngine], None] | None = None,
                 max_restarts: int = 1, concurrency: int = 1, receives_weights: bool = True) -> None:
        if concurrency < 1:
            raise ValueError(f"SGLangEngine: concurrency must be >= 1 (--rollout-max-inflight), got {concurrency}")
        self._t = transport
        self._ranks = getattr(transport, "ranks", None)
        self.concurrency = concurrency
        self.receives_weights = receives_weights
        self.vocab_size = vocab_size
        self._update_dtype = update_dtype
        self.fp8_block = fp8_block
        self._version = self._initial_version = weight_version
        self.deterministic = deterministic
        self.on_restart = on_restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self._session = False
        self._released: set[str] = set()
        self._flush_pending = False
        self._closed = False

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def colocated(cls, model_path: str | os.PathLike, *, server_kwargs: dict | None = None, tp_size: int = 1,
                  ranks=None, **engine_kw) -> SGLangEngine:
        """In-process `sglang.Engine` on the GPUs of this process and the next `tp_size - 1` ranks of its node
        (`base_gpu_id` = LOCAL_RANK), sized to share them with Megatron: `enable_memory_saver=True`,
        `mem_fraction_static=0.5`, token-id I/O; any `server_kwargs` (e.g. from `--sglang-*`) win. `ranks`: the
        engine's training ranks when `tp_size` > 1 (each TP rank loads from its own rank's buffer). On a CPU-only
        machine: `device="cpu"`, torch-native attention, and `SGLANG_USE_CPU_ENGINE=1` (the contract lane)."""
        kw = {"model_path": str(model_path), "skip_tokenizer_init": True, "log_level": "error", "tp_size": tp_size}
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
            kw.update(enable_memory_saver=True, mem_fraction_static=0.5,
                      base_gpu_id=check_local_tp(tp_size, local_rank, local_world))
        else:
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
            kw.update(device="cpu", attention_backend="torch_native", max_total_tokens=8192)
        kw.update(server_kwargs or {})
        transport = LocalTransport(kw, ranks=ranks)
        engine_kw.setdefault("vocab_size", _config_value(kw["model_path"], "vocab_size"))
        engine_kw.setdefault("update_dtype", _engine_dtype(kw.get("dtype"), kw["model_path"]))
        engine_kw.setdefault("deterministic", bool(kw.get("enable_deterministic_inference")))
        engine_kw.setdefault("weight_version", kw.get("weight_version", "default"))
        return cls(transport, **engine_kw)

    @classmethod
    def remote(cls, urls: Sequence[str] = (), *, router_url: str | None = None, timeout_s: float = 600.0,
               update_timeout_s: float = 300.0, sync_backend: str | None = None,
               servers: Sequence[ServerProcess] = (), model_path: str | os.PathLike | None = None,
               max_requests: int = 256, **engine_kw) -> SGLangEngine:
        """SGLang servers at `urls` and/or an `sglang-router` at `router_url` (generation goes through it; without
        `urls` the servers are the router's workers). One HTTP request per sample, at most `max_requests` in
        flight from this process. `sync_backend`: the weight broadcast backend, nccl on GPU / gloo on CPU."""
        transport = HTTPTransport(urls, router_url=router_url, timeout_s=timeout_s, update_timeout_s=update_timeout_s,
                                  sync_backend=sync_backend, servers=servers, max_requests=max_requests)
        info = transport.server_info
        path = model_path or info.get("model_path")
        if path and Path(path).is_dir():
            engine_kw.setdefault("vocab_size", _config_value(path, "vocab_size"))
        engine_kw.setdefault("update_dtype", _engine_dtype(info.get("dtype"), path))
        engine_kw.setdefault("deterministic", bool(info.get("enable_deterministic_inference")))
        return cls(transport, **engine_kw)

    # ------------------------------------------------------------------------------------- state
    @property
    def mode(self) -> str:
        return self._t.kind

    @property
    def weight_version(self) -> str:
        return self._version

    @property
    def update_dtype(self) -> torch.dtype | None:
        """The engine's weight dtype (bf16/fp16) so `push_weights` casts before bucketing; None for fp32 or
        unknown (the engine casts while loading)."""
        return self._update_dtype

    @property
    def sglang_version(self) -> tuple[int, ...]:
        return self._t.version

    def _check_ready(self) -> None:
        if self._closed:
            raise RuntimeError("SGLangEngine is shut down")
        if self._session:
            raise RuntimeError("SGLangEngine: a weight-update session is open; call end_weight_update() first")

    def _call(self, fn: Callable, what: str):
        """Run a transport call; if the engine died, restart it once (then re-push via `on_restart`) and retry."""
        try:
            return fn()
        except EngineDiedError as e:
            cause = e
        except Exception as e:
            if self._t.alive():  # an ordinary error (bad request, refused update): not a death
                raise
            cause = e
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"SGLang engine ({self.mode}) died during {what} after {self.restarts} restart(s); "
                               f"giving up: {cause}") from cause
        self.restarts += 1
        log.warning("SGLang engine died during %s (%s); restarting it (%d/%d)", what, cause, self.restarts,
                    self.max_restarts)
        self._t.restart()
        self._released.clear()
        if self._session:
            self._session = False
            raise WeightUpdateError(f"SGLang engine died during {what} inside a weight-update session; it was "
                                    "restarted with its start-up weights: push the weights again") from cause
        if self.on_restart is not None:
            self.on_restart(self)
        elif self._version != self._initial_version:
            stale, self._version = self._version, self._initial_version
            raise RuntimeError(f"SGLang engine died during {what} and was restarted; it lost weights {stale!r}: "
                               "push the weights again (or pass on_restart=...)") from cause
        return fn()

    # ---------------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        """Sample continuations; log-probs are SGLang's `log_softmax(logits / T)` before top-k/top-p."""
        self._check_ready()
        if any(len(p) == 0 for p in prompts):
            raise ValueError("SGLangEngine.generate: empty prompt")
        if not prompts:
            return []
        base = sampling.seed
        sps = [sampling_dict(sampling, seed=(base + i if self.deterministic and base is not None else None))
               for i in range(len(prompts))]
        ids = [list(map(int, p)) for p in prompts]
        outs = self._call(lambda: self._t.generate(ids, sps, return_logprob=True), "generate")
        if len(outs) != len(prompts):
            raise RuntimeError(f"SGLang returned {len(outs)} results for {len(prompts)} prompts")
        client_stops = sampling.stop_token_ids if sampling.ignore_eos else ()
        # a remote server reports the label its weights were pushed with (by this or another process)
        remote = self.mode == "remote"
        return [rollout_from_output(p, o, (remote and o.get("meta_info", {}).get("weight_version")) or self._version,
                                    client_stops) for p, o in zip(prompts, outs, strict=True)]

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
              temperature: float = 1.0) -> list[list[float]]:
        """Prefill-only (`max_new_tokens=0`) log-probs of `sequences[i][prompt_lens[i]:]`.

        SGLang's input log-probs are raw `log_softmax(logits)`; for T != 1 the full distribution is requested
        (`top_logprobs_num` = vocab) and rescaled exactly, log_softmax(l / T) = log_softmax(logp_raw / T), which
        costs [tokens, vocab] floats per call: fine for probes and checks, not for bulk teacher scoring.
        """
        self._check_ready()
        check_score_args(sequences, prompt_lens, temperature)
        if not sequences:
            return []
        temp = 1.0 if temperature < GREEDY_EPS else float(temperature)
        ids = [list(map(int, s)) for s in sequences]
        sps = [{"max_new_tokens": 0, "temperature": 1.0} for _ in ids]
        kw = {"return_logprob": True, "logprob_start_len": [p - 1 for p in prompt_lens]}
        if temp != 1.0:
            if not self.vocab_size:
                raise RuntimeError("score at temperature != 1 needs the vocab size (SGLangEngine(vocab_size=...))")
            kw["top_logprobs_num"] = [self.vocab_size] * len(ids)
        outs = self._call(lambda: self._t.generate(ids, sps, **kw), "score")
        result = []
        for s, p, out in zip(ids, prompt_lens, outs, strict=True):
            meta = out["meta_info"]
            n = len(s) - p
            tail = _tail_logprobs(meta["input_token_logprobs"], s, n)
            if temp == 1.0:
                result.append([float(e[0]) for e in tail])
                continue
            tops = meta["input_top_logprobs"][-n:] if n else []
            row = []
            for tok, top in zip(s[-n:], tops, strict=True):
                raw = torch.tensor([float(e[0]) for e in top], dtype=torch.float64) / temp
                target = next(float(e[0]) for e in top if int(e[1]) == tok) / temp
                row.append(target - torch.logsumexp(raw, 0).item())
            result.append(row)
        return result

    # ---------------------------------------------------------------------------------- weight sync
    def _step(self, fn: Callable[[list | None], None], *, digest: str | None = None, failed=None) -> None:
        """One weight-update step; with engine TP ranks, a collective in which they contribute (`engine_ranks`)."""
        if not self.receives_weights:
            raise WeightUpdateError("this SGLangEngine is a generation client of remote servers; rank 0 pushes the "
                                    "weights")
        if self._ranks is None:
            if failed is not None:
                raise failed
            fn(None)
            return
        info = {"update_dtype": dtype_name(self._update_dtype), "fp8_block": self.fp8_block}
        self._ranks.lead(fn, digest=digest, info=info, failed=failed)

    def begin_weight_update(self) -> None:
        def begin(_peers) -> None:
            if self._closed:
                raise WeightUpdateError("SGLangEngine is shut down")
            if self._session:
                log.warning("SGLangEngine: begin_weight_update() with a session open; closing it first")
                self._call(self._t.end, "end_weight_update")
                self._session = False
            self._call(self._t.begin, "begin_weight_update")
            self._session = True

        self._step(begin)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named tensors (one flattened payload / broadcast per bucket)."""
        failed, named = None, []
        try:
            if not self._session:
                raise WeightUpdateError("update_weights must run between begin_weight_update() and "
                                        "end_weight_update()")
            named = [(n, t) for n, t in named_tensors]
            if named and self.fp8_block is not None:
                from rlad_megatron.rollout.sglang.fp8_weights import quantize_named_tensors

                named = quantize_named_tensors(named, block=self.fp8_block)
        except Exception as e:  # noqa: BLE001 - reported to the engine's other ranks, then raised
            failed = e
        if not named and failed is None:
            return

        def load(peers) -> None:
            try:
                if peers is None:
                    self._call(lambda: self._t.load_bucket(named), "update_weights")
                else:
                    self._call(lambda: self._t.load_bucket(named, peers), "update_weights")
            except WeightUpdateError:
                raise
            except Exception as e:
                raise WeightUpdateError(f"SGLang update_weights failed: {type(e).__name__}: {e}") from e

        self._step(load, digest=bucket_digest(named) if failed is None else "", failed=failed)

    def end_weight_update(self, version: str) -> None:
        def end(_peers) -> None:
            if not self._session:
                raise WeightUpdateError("end_weight_update() without begin_weight_update()")
            self._session = False
            self._call(self._t.end, "end_weight_update")
            self._version = str(version)
            try:
                self._t.set_version(self._version)
            except Exception as e:  # noqa: BLE001 - the label is ours; an engine without the endpoint keeps serving
                log.debug("update_weight_version failed: %s", e)
            self._flush_pending = True
            if "kv_cache" not in self._released:
                self.flush_cache()

        self._step(end)

    # ------------------------------------------------------------------------------ memory/control
    def release_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        """Free engine GPU memory (engine must be idle); a no-op on CPU, as in SGLang, and on a generation client
        (the process that pushes the weights manages the servers' memory). Tags already released are skipped."""
        self._check_tags(tags)
        todo = [t for t in tags if t not in self._released]
        if not self.receives_weights or not todo:
            return
        self._call(lambda: self._t.release(todo), "release_memory")
        self._released.update(todo)

    def resume_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        """Re-allocate released memory. Staged use: ["weights"] -> push -> ["kv_cache", "cuda_graph"].
        Only tags this engine released are sent: SGLang 0.5.23's scheduler dies (KeyError in its weight updater)
        on resuming a tag that was never released."""
        self._check_tags(tags)
        todo = [t for t in tags if t in self._released]
        if not self.receives_weights:
            return
        if todo:
            self._call(lambda: self._t.resume(todo), "resume_memory")
            self._released.difference_update(todo)
        if self._flush_pending and "kv_cache" not in self._released:
            self.flush_cache()

    @staticmethod
    def _check_tags(tags: Sequence[str]) -> None:
        unknown = set(tags) - MEMORY_TAGS
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; expected a subset of {sorted(MEMORY_TAGS)}")

    def flush_cache(self) -> None:
        self._call(self._t.flush, "flush_cache")
        self._flush_pending = False

    def health(self) -> bool:
        return not self._closed and self._t.alive()

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._t.close()


# ------------------------------------------------------------------------------------------- helpers


def _config_value(model_path: str | os.PathLike | None, key: str):
    try:
        return json.loads((Path(model_path) / "config.json").read_text()).get(key)
    except (OSError, TypeError, ValueError):
        return None


def _engine_dtype(dtype: str | None, model_path: str | os.PathLike | None) -> torch.dtype | None:
    """bf16/fp16 when the engine runs in it (explicit dtype, else the checkpoint's torch_dtype); None otherwise."""
    name = dtype if dtype and dtype != "auto" else None
    if name is None:
        name = _config_value(model_path, "torch_dtype") or _config_value(model_path, "dtype")
    resolved = _DTYPES.get(str(name).removeprefix("torch.")) if name else None
    return resolved if resolved in (torch.bfloat16, torch.float16) else None


__all__ = [
    "EngineDiedError", "HTTPTransport", "LocalTransport", "LogprobParityError", "SGLangEngine", "ServerProcess",
    "check_logprob_parity", "init_weight_group", "require_sglang", "rollout_from_output", "sampling_dict",
    "tail_logprobs", "wait_until_healthy",
]
