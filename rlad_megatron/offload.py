"""Move Megatron training state (student params/grads/optimizer, frozen teacher) out of GPU memory while SGLang
generates on the same GPU, and back before training.

Two mechanisms, picked per tag:

* `torch_memory_saver` (when importable and the tag's tensors were allocated inside `offloader.region(tag)`):
  `pause(tag)` releases the physical memory and keeps the virtual addresses, `resume(tag)` restores it; the
  content is kept in a CPU backup (`enable_cpu_backup=True`). Nothing else changes, views and CUDA graphs stay valid.
* Explicit moves (everything registered with `register(tag, ...)`, any torch): every distinct CUDA storage
  reachable from the objects (params, `.grad`, Megatron `.main_grad` and DDP param/grad buffers, optimizer state
  and fp32 master params) is copied to pinned CPU memory and resized to 0 bytes; `onload` resizes and copies back.
  Working on storages, not tensors, keeps every view (Megatron's params and grads are views into flat buffers)
  pointing at the right bytes. Storages that a tag staying on the GPU also uses are left alone (offloading
  "optimizer" before the weight export must not take a fp32 model's params, which are its optimizer's params).
  Frozen tags (a teacher) keep their CPU copy: later offloads only free the GPU.

On a machine without CUDA both are honest no-ops (there is no device memory to free) and say so in the stats.
`to_rollout` / `to_training` sequence the offloader with a rollout engine in slime's staged order.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class OffloadStats:
    backend: str
    tags: tuple[str, ...]
    bytes: int = 0  # bytes copied (move backend) or paused/resumed tags' tensors counted by the caller
    storages: int = 0
    seconds: float = 0.0
    gpu_allocated_before: int = 0
    gpu_allocated_after: int = 0

    @property
    def freed(self) -> int:
        return self.gpu_allocated_before - self.gpu_allocated_after


def memory_saver():
    """The `torch_memory_saver` singleton, or None when the package is missing or too old for CPU backups."""
    try:
        from torch_memory_saver import torch_memory_saver as tms
    except Exception:  # noqa: BLE001 - missing, or a build that fails to load its CUDA hook
        return None
    if "enable_cpu_backup" not in inspect.signature(tms.region).parameters:
        return None  # without a backup a pause would throw the weights away
    return tms


def tensors_of(obj) -> Iterator[torch.Tensor]:
    """Every tensor an object keeps: a tensor, a Module (params, grads, main_grads, buffers, Megatron DDP flat
    buffers), an optimizer (torch or Megatron, chained or not), a `Model` wrapper (`.module`), or a list of these."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield p
            for extra in (p.grad, getattr(p, "main_grad", None)):
                if isinstance(extra, torch.Tensor):
                    yield extra
        yield from torch.nn.Module.buffers(obj)  # Megatron DDP shadows .buffers with a list attribute
        for bufs in (getattr(obj, "buffers", None), getattr(obj, "expert_parallel_buffers", None)):
            if isinstance(bufs, list):
                for b in bufs:
                    for name in ("param_data", "grad_data"):
                        t = getattr(b, name, None)
                        if isinstance(t, torch.Tensor):
                            yield t
    elif hasattr(obj, "chained_optimizers"):  # Megatron ChainedOptimizer
        for opt in obj.chained_optimizers:
            yield from tensors_of(opt)
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            for p in group["params"]:
                yield p
                if p.grad is not None:
                    yield p.grad
        for state in obj.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    elif isinstance(getattr(obj, "optimizer", None), torch.optim.Optimizer):
        # Megatron optimizer wrapper: its torch optimizer holds the master params and the Adam state
        yield from tensors_of(obj.optimizer)
    elif hasattr(obj, "module") and isinstance(obj.module, torch.nn.Module):
        yield from tensors_of(obj.module)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_of(item)
    else:
        raise TypeError(f"offload: don't know the tensors of a {type(obj).__name__}")


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A 1-D uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass
class _Stash:
    storage: torch.UntypedStorage
    cpu: torch.Tensor


def offload_storages(tensors: Iterable[torch.Tensor], device_type: str = "cuda", pin_memory: bool = True,
                     keep: dict[int, torch.Tensor] | None = None, exclude: set[int] | frozenset = frozenset()
                     ) -> list[_Stash]:
    """Copy each distinct `device_type` storage behind `tensors` to CPU and shrink it to 0 bytes.

    `keep`: CPU copies from an earlier offload of the same (frozen, unchanged) storages, keyed by storage
    identity; those are reused instead of copied again. `exclude`: storage identities to leave in place.
    """
    stashes, seen = [], set(exclude)
    for t in tensors:
        if t.device.type != device_type:
            continue
        st = t.untyped_storage()
        key = st._cdata  # identity of the storage itself (shared by all its views and wrappers)
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        cpu = keep.get(key) if keep is not None else None
        if cpu is None or cpu.numel() != st.nbytes():
            cpu = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=pin_memory and device_type == "cuda")
            cpu.copy_(_bytes_of(st), non_blocking=True)
        stashes.append(_Stash(st, cpu))
    if device_type == "cuda":
        torch.cuda.synchronize()
    for s in stashes:
        s.storage.resize_(0)
    return stashes


def onload_storages(stashes: list[_Stash]) -> None:
    """Undo `offload_storages`: grow each storage back and copy its bytes in."""
    for s in stashes:
        s.storage.resize_(s.cpu.numel())
        _bytes_of(s.storage).copy_(s.cpu, non_blocking=True)
    if any(s.storage.device.type == "cuda" for s in stashes):
        torch.cuda.synchronize()


@dataclass
class _Tag:
    objects: list = field(default_factory=list)
    frozen: bool = False
    in_region: bool = False  # allocated inside torch_memory_saver.region(tag)
    stashes: list[_Stash] = field(default_factory=list)
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    offloaded: bool = False


class Offloader:
    """Per-tag GPU offload for colocating Megatron with SGLang. `backend`: "auto" (memory saver where a tag was
    allocated in `region`, moves otherwise), "move", or "none"; "none" is forced without CUDA."""

    def __init__(self, backend: str = "auto", pin_memory: bool = True) -> None:
        if backend not in ("auto", "move", "none"):
            raise ValueError(f"offload backend must be auto, move or none, got {backend!r}")
        self.backend = backend if torch.cuda.is_available() else "none"
        self.pin_memory = pin_memory
        self._tms = memory_saver() if self.backend == "auto" else None
        if self._tms is not None and "torch_memory_saver" not in os.environ.get("LD_PRELOAD", ""):
            with contextlib.suppress(Exception):  # in-process hook (CUDAPluggableAllocator) when not preloaded
                self._tms.hook_mode = "torch"
        self._tags: dict[str, _Tag] = {}

    @property
    def uses_memory_saver(self) -> bool:
        return self._tms is not None

    def _tag(self, tag: str) -> _Tag:
        return self._tags.setdefault(tag, _Tag())

    @contextlib.contextmanager
    def region(self, tag: str):
        """Allocate a tag's long-lived tensors (model, optimizer state) inside this to let torch_memory_saver
        pause them; a no-op without it (then `register` the objects)."""
        if self._tms is None:
            yield
            return
        self._tag(tag).in_region = True
        with self._tms.region(tag=tag, enable_cpu_backup=True):
            yield

    def register(self, tag: str, *objects, frozen: bool = False) -> None:
        """Objects whose tensors `offload(tag)` moves (modules, optimizers, `Model`s, tensors)."""
        t = self._tag(tag)
        t.objects.extend(objects)
        t.frozen = t.frozen or frozen

    def export_context(self):
        """Wrap weight export for CUDA-IPC sync: memory-saver (VMM) allocations cannot be IPC-shared."""
        disable = getattr(self._tms, "disable", None)
        return disable() if callable(disable) else contextlib.nullcontext()

    def is_offloaded(self, tag: str) -> bool:
        return tag in self._tags and self._tags[tag].offloaded

    def _select(self, tags: tuple[str, ...]) -> list[str]:
        unknown = [t for t in tags if t not in self._tags]
        if unknown:
            raise KeyError(f"offload: unknown tags {unknown}; known: {sorted(self._tags)}")
        return list(tags) or list(self._tags)

    def offload(self, *tags: str) -> OffloadStats:
        """Free the GPU memory of `tags` (all tags when none given); idempotent per tag."""
        return self._run(self._select(tags), offload=True)

    def onload(self, *tags: str) -> OffloadStats:
        """Bring `tags` (all when none given) back to the GPU; idempotent per tag."""
        return self._run(self._select(tags), offload=False)

    def _resident_storages(self, leaving: list[str]) -> set[int]:
        """Storages that tags staying on the GPU use (a fp32 model's params are also its optimizer's params)."""
        keys = set()
        for name, tag in self._tags.items():
            if name not in leaving and not tag.offloaded:
                keys.update(t.untyped_storage()._cdata for obj in tag.objects for t in tensors_of(obj) if t.is_cuda)
        return keys

    def _run(self, names: list[str], offload: bool) -> OffloadStats:
        stats = OffloadStats(self.backend if not self._tms else "auto(memory_saver+move)", tuple(names))
        if self.backend == "none":
            return stats
        stats.gpu_allocated_before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        resident = self._resident_storages(names) if offload else set()
        for name in names:
            tag = self._tags[name]
            if tag.offloaded == offload:
                continue
            if tag.in_region and self._tms is not None:
                (self._tms.pause if offload else self._tms.resume)(name)
            if offload:
                tensors = (t for obj in tag.objects for t in tensors_of(obj))
                tag.stashes = offload_storages(tensors, "cuda", self.pin_memory, tag.keep if tag.frozen else None,
                                               exclude=resident)
                if tag.frozen:
                    tag.keep = {s.storage._cdata: s.cpu for s in tag.stashes}
                stats.storages += len(tag.stashes)
                stats.bytes += sum(s.cpu.numel() for s in tag.stashes)
            else:
                onload_storages(tag.stashes)
                stats.storages += len(tag.stashes)
                stats.bytes += sum(s.cpu.numel() for s in tag.stashes)
                tag.stashes = []
            tag.offloaded = offload
        if offload:
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver, for SGLang's process
        stats.seconds = time.perf_counter() - t0
        stats.gpu_allocated_after = torch.cuda.memory_allocated()
        return stats


# ------------------------------------------------------------------------------------- phase switches


ALL_ENGINE_TAGS = ("weights", "kv_cache", "cuda_graph")


def to_training(engine, offloader: Offloader, *tags: str) -> OffloadStats:
    """Rollout -> training: the engine (idle) releases weights, KV cache and CUDA graphs; `tags` come back."""
    if engine is not None:
        engine.release_memory(ALL_ENGINE_TAGS)
    return offloader.onload(*tags)


def to_rollout(engine, offloader: Offloader, push: Callable[[], object], *,
               before_push: tuple[str, ...] = (), after_push: tuple[str, ...] = ()) -> list[OffloadStats]:
    """Training -> rollout in slime's staged order, keeping the peak low:

    offload `before_push` (optimizer state, grads, teacher: not needed to export) -> engine resumes its weights ->
    `push()` (export + sync; run on every rank, the export is collective) -> offload `after_push` (the student) ->
    engine resumes KV cache + CUDA graphs (an `SGLangEngine` flushes its prefix cache then, once).
    `engine` is None on ranks without one.
    """
    stats = [offloader.offload(*before_push)] if before_push else []
    if engine is not None:
        engine.resume_memory(("weights",))
    with offloader.export_context():
        push()
    if after_push:
        stats.append(offloader.offload(*after_push))
    if engine is not None:
        engine.resume_memory(("kv_cache", "cuda_graph"))
    return stats
