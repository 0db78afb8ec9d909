"""Colocated transport: an in-process `sglang.Engine` on the training GPU(s) of its ranks.

`sglang.Engine(enable_memory_saver=True, skip_tokenizer_init=True, tp_size=N, base_gpu_id=LOCAL_RANK, ...)`
(scheduler/detokenizer child processes). Generation calls from many threads are in flight together (`LoopPump`
runs the engine's event loop for them), so the scheduler batches them continuously. A weight bucket is packed into
SGLang's `FlattenedTensorBucket`, serialised with `MultiprocessingSerializer` (CUDA IPC handles once
`monkey_patch_torch_reductions()` is applied) and loaded with `update_weights_from_tensor(load_format=
"flattened_bucket", flush_cache=False)` with one payload per engine TP rank: with TP > 1 each from the training rank
on that TP rank's GPU (`engine_ranks`). Memory is released and resumed by tag (`weights`, `kv_cache`,
`cuda_graph`) for the staged hand-over with Megatron (`rlad_megatron.offload`).

Importing this module needs neither sglang nor a GPU; starting an engine without sglang raises a `RuntimeError`
that says how to install it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from rlad_megatron.rollout.sglang.args import import_sglang, parse_version
from rlad_megatron.rollout.sglang.loop_pump import LoopPump
from rlad_megatron.rollout.sglang.transport import check_result

INSTALL_HINT = (
    "SGLang is not importable here. On a GPU machine: pip install -e .[gpu] (sglang, sglang-router, "
    "torch_memory_saver); for the CPU contract lane see docs/sglang_cpu_lane.md"
)


def require_sglang():
    """Import sglang or raise a RuntimeError with install instructions."""
    try:
        return import_sglang()
    except Exception as e:  # CUDA-less installs fail with OSError/RuntimeError, not only ImportError
        raise RuntimeError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e


class LocalTransport:
    """An in-process `sglang.Engine` (scheduler/detokenizer child processes) on this process's GPU(s).

    `ranks`: with engine TP > 1 in a multi-rank job, the engine's training ranks (`engine_ranks.EngineRanks`); each
    bucket is then loaded with one payload per TP rank, gathered from the rank on that TP rank's GPU. Without it
    (one process drives the whole engine) every TP rank gets this process's payload.
    """

    kind = "colocated"

    def __init__(self, server_kwargs: dict, ranks=None) -> None:
        self._sglang = require_sglang()
        self.server_kwargs = dict(server_kwargs)
        self.tp_size = int(self.server_kwargs.get("tp_size", 1))
        self.ranks = ranks
        if ranks is not None and ranks.size != self.tp_size:
            raise ValueError(f"colocated SGLang engine: tp_size {self.tp_size} != its {ranks.size} training ranks")
        self.version = parse_version(getattr(self._sglang, "__version__", "0"))
        self.engine = None
        self.pump: LoopPump | None = None
        self._start()

    def _start(self) -> None:
        # under torchrun, TORCHELASTIC_USE_AGENT_STORE makes torch's tcp:// rendezvous a client of torchrun's own
        # store: the engine's schedulers (which inherit the environment) would never find the store of their own
        # process group and wait forever. They are not part of the training job's store: start them without it.
        saved = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        try:
            self.engine = self._sglang.Engine(**self.server_kwargs)
        finally:
            if saved is not None:
                os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved
        self.has_session = hasattr(self.engine, "begin_weight_update")
        self.pump = LoopPump(self.engine.loop)

    # generation: every call is a coroutine on the engine's loop, so calls from many threads batch together
    def generate(self, input_ids: list[list[int]], sampling: list[dict], **kw) -> list[dict]:
        out = self.pump.run(lambda: self.engine.async_generate(input_ids=input_ids, sampling_params=sampling, **kw))
        return out if isinstance(out, list) else [out]

    def _sync(self, fn, *args, **kw):
        """A blocking `sglang.Engine` method (it runs the engine's loop itself): never during generation."""
        with self.pump.paused():
            return fn(*args, **kw)

    # weights
    def begin(self) -> None:
        if self.has_session:
            check_result(self._sync(self.engine.begin_weight_update), "begin_weight_update")

    def end(self) -> None:
        if self.has_session:
            check_result(self._sync(self.engine.end_weight_update), "end_weight_update")

    def load_bucket(self, named: list[tuple[str, torch.Tensor]], peers: list | None = None) -> None:
        """Load one bucket. `peers`: the other TP ranks' contributions (`EngineRanks.lead`), in TP-rank order; each
        carries one serialised payload per flattened group, like this rank's own `pack_bucket`."""
        if self.ranks is not None and (peers is None or len(peers) != self.tp_size - 1):
            raise RuntimeError(f"engine TP {self.tp_size}: need the payloads of {self.tp_size - 1} peer rank(s), "
                               f"got {0 if peers is None else len(peers)}")
        payloads, alive = pack_bucket(named)
        on_cuda = named[0][1].is_cuda
        for g, own in enumerate(payloads):
            per_rank = [own, *(c.payloads[g] for c in peers)] if peers else [own] * self.tp_size
            result = self._sync(self.engine.update_weights_from_tensor, per_rank, load_format="flattened_bucket",
                                flush_cache=False)
            check_result(result, "update_weights_from_tensor")
        del alive, payloads
        if on_cuda:
            torch.cuda.ipc_collect()

    def set_version(self, version: str) -> None:
        """The in-process engine has no version call; `SGLangEngine` labels rollouts itself."""

    # memory and control
    def release(self, tags: Sequence[str]) -> None:
        self._sync(_call_with_tags, self.engine.release_memory_occupation, tags)

    def resume(self, tags: Sequence[str]) -> None:
        self._sync(_call_with_tags, self.engine.resume_memory_occupation, tags)

    def flush(self) -> None:
        check_result(self._sync(self.engine.flush_cache), "flush_cache")

    def alive(self) -> bool:
        if self.engine is None:
            return False
        pids = getattr(self.engine, "get_all_child_pids", None)
        if pids is None:
            return True  # no way to tell on this version; errors surface on the next call
        import psutil

        for pid in pids():
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                return False
        return True

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        if self.engine is not None:
            try:
                with self.pump.paused():
                    self.engine.shutdown()
            finally:
                self.engine = None


def pack_bucket(named: list[tuple[str, torch.Tensor]]) -> tuple[list[str], object]:
    """A bucket -> (one serialised `{"flattened_tensor", "metadata"}` payload per flattened group, the buffers to
    keep alive until the engine has loaded them). SGLang's own `FlattenedTensorBucket` packs (so the layout matches
    the installed version; before 0.5.23 one group per dtype); CUDA tensors travel as CUDA IPC handles (after
    `monkey_patch_torch_reductions`, which names the GPU by UUID), CPU ones through shared-memory files."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    serializer = _serializer()
    if named[0][1].is_cuda:
        _patch_torch_reductions()
    else:  # CPU tensors to a child process: the default fd strategy fails across process trees
        torch.multiprocessing.set_sharing_strategy("file_system")
    if getattr(FlattenedTensorBucket, "supports_multi_dtypes", False):
        groups = [named]
    else:  # older SGLang concatenates elements, one dtype per bucket
        by_dtype: dict[torch.dtype, list] = {}
        for name, t in named:
            by_dtype.setdefault(t.dtype, []).append((name, t))
        groups = list(by_dtype.values())
    payloads, alive = [], []
    for group in groups:
        bucket = FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in group])
        data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
        payloads.append(serializer.serialize(data, output_str=True))
        alive.append(data)
    return payloads, alive


def _call_with_tags(fn, tags: Sequence[str]) -> None:
    try:
        result = fn(tags=list(tags))
    except TypeError:  # SGLang < 0.4.8: release/resume everything, no tags
        result = fn()
    check_result(result, fn.__name__)


def _serializer():
    from sglang.srt.utils import MultiprocessingSerializer

    return MultiprocessingSerializer


def _patch_torch_reductions() -> None:
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:  # moved in some releases
        from sglang.srt.patch_torch import monkey_patch_torch_reductions
    monkey_patch_torch_reductions()
