"""Colocated transport: an in-process `sglang.Engine` on the training GPU of this process.

`sglang.Engine(enable_memory_saver=True, skip_tokenizer_init=True, ...)` (scheduler/detokenizer child processes).
A weight bucket is packed into SGLang's `FlattenedTensorBucket`, serialised with `MultiprocessingSerializer` (CUDA
IPC handles once `monkey_patch_torch_reductions()` is applied; one payload per engine TP rank) and loaded with
`update_weights_from_tensor(load_format="flattened_bucket", flush_cache=False)`. Memory is released and resumed by
tag (`weights`, `kv_cache`, `cuda_graph`) for the staged hand-over with Megatron (`rlad_megatron.offload`).

Importing this module needs neither sglang nor a GPU; starting an engine without sglang raises a `RuntimeError`
that says how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlad_megatron.rollout.sglang.args import import_sglang, parse_version
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
    """An in-process `sglang.Engine` (scheduler/detokenizer child processes) on this process's GPU(s)."""

    kind = "colocated"

    def __init__(self, server_kwargs: dict) -> None:
        self._sglang = require_sglang()
        self.server_kwargs = dict(server_kwargs)
        self.tp_size = int(self.server_kwargs.get("tp_size", 1))
        self.version = parse_version(getattr(self._sglang, "__version__", "0"))
        self.engine = None
        self._start()

    def _start(self) -> None:
        self.engine = self._sglang.Engine(**self.server_kwargs)
        self.has_session = hasattr(self.engine, "begin_weight_update")

    # generation
    def generate(self, input_ids: list[list[int]], sampling: list[dict], **kw) -> list[dict]:
        out = self.engine.generate(input_ids=input_ids, sampling_params=sampling, **kw)
        return out if isinstance(out, list) else [out]

    # weights
    def begin(self) -> None:
        if self.has_session:
            check_result(self.engine.begin_weight_update(), "begin_weight_update")

    def end(self) -> None:
        if self.has_session:
            check_result(self.engine.end_weight_update(), "end_weight_update")

    def load_bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        serializer = _serializer()
        on_cuda = named[0][1].is_cuda
        if on_cuda:
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
        for group in groups:
            bucket = FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in group])
            data = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
            # one payload per engine TP rank: each rank opens (and releases) its own IPC handle
            payloads = [serializer.serialize(data, output_str=True) for _ in range(self.tp_size)]
            result = self.engine.update_weights_from_tensor(payloads, load_format="flattened_bucket",
                                                            flush_cache=False)
            check_result(result, "update_weights_from_tensor")
            del bucket, data, payloads
        if on_cuda:
            torch.cuda.ipc_collect()

    def set_version(self, version: str) -> None:
        """The in-process engine has no version call; `SGLangEngine` labels rollouts itself."""

    # memory and control
    def release(self, tags: Sequence[str]) -> None:
        _call_with_tags(self.engine.release_memory_occupation, tags)

    def resume(self, tags: Sequence[str]) -> None:
        _call_with_tags(self.engine.resume_memory_occupation, tags)

    def flush(self) -> None:
        check_result(self.engine.flush_cache(), "flush_cache")

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
                self.engine.shutdown()
            finally:
                self.engine = None


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
