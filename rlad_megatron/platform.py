"""The platform: torch.distributed, Megatron parallel state, seeds, and the CPU compatibility layer.

This is the only module that patches torch/megatron. On a CUDA machine none of the patches run:
`init()` picks nccl, calls Megatron's own seeding and returns. On a CPU-only machine (CI, laptops)
`apply_cpu_compat()` installs the small layer megatron-core 0.16-0.19 needs to run with gloo
(see docs/cpu.md for each item and why):

1. a CPU RNG-states tracker in place of Megatron's CUDA tracker;
2. `torch.cuda.current_device()` -> "cpu" (buffers, RoPE, TP collectives, DDP buffers);
3. `torch.cuda.synchronize` / `current_stream` / `stream` -> no-ops (dist_checkpointing, DDP in 0.19);
4. a TorchFunctionMode rewriting literal `device="cuda"` to CPU (schedules, optimizer, clip_grads)
   and reporting CPU tensors as `torch.cuda.*Tensor` to Megatron's optimizer type checks;
5. a fork-context queue for dist_checkpointing's async writer (a spawn Manager costs 5-15 s);
6. `batch_p2p_comm=False` is enforced by `models.builder` on CPU (gloo swaps same-peer messages).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from rlad_megatron.errors import RankLocalError

_CPU_COMPAT_APPLIED = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# CPU compatibility layer
# --------------------------------------------------------------------------------------------------


class CpuRNGStatesTracker:
    """Megatron's CudaRNGStatesTracker on the CPU generator: named RNG streams entered with `fork()`."""

    def __init__(self, *args, **kwargs) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` to CPU and makes `.cuda()` a no-op inside megatron-core."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NoStream:
    def wait_stream(self, *a, **k) -> None: ...
    def synchronize(self) -> None: ...
    def record_event(self, *a, **k) -> None: ...
    def wait_event(self, *a, **k) -> None: ...


def apply_cpu_compat() -> None:
    """Install the CPU layer (idempotent). Refuses to run where CUDA is available."""
    global _CPU_COMPAT_APPLIED
    if _CPU_COMPAT_APPLIED:
        return
    if has_cuda():
        raise RuntimeError("apply_cpu_compat() is for CPU-only machines; CUDA is available here")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    _CudaToCpu().__enter__()  # thread-local: entered in the main thread of each rank

    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if hasattr(filesystem_async, "_results_queue") and filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=_exit_with_parent)
        filesystem_async._results_queue = manager.Queue()
    _CPU_COMPAT_APPLIED = True


@contextlib.contextmanager
def native_torch():
    """The CPU layer's device-rewriting mode off, for code that never asks for CUDA (the rollout engines' decode
    loops). The mode costs a Python call per torch op: the tiny HF engine's decode ran 1.5x slower under it."""
    from torch import overrides

    if not isinstance(overrides._get_current_function_mode(), _CudaToCpu):
        yield
        return
    with overrides._pop_mode_temporarily():
        yield


def _exit_with_parent() -> None:
    """Linux: the checkpoint writer's Manager process gets SIGTERM when its rank dies (even by kill -9)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _install_cpu_rng_tracker(seed: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    tracker.add("data-parallel-rng", seed)
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def fix_shared_optimizer_step(optimizer) -> None:
    """After loading a DistributedOptimizer checkpoint every param shares one `step` tensor; torch's
    foreach Adam then increments it once per param. Give each param its own copy."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for state in torch_opt.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].clone()


# --------------------------------------------------------------------------------------------------
# distributed + parallel state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The student's parallel layout (Megatron's global parallel state)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = 30.0  # Megatron's --distributed-timeout-minutes default
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES


def timeout_minutes() -> float:
    """The collective timeout of this job (`--distributed-timeout-minutes`): no rank waits longer for another."""
    return _timeout_minutes


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """`torch.distributed` from the torchrun environment (a 1-rank group when run without torchrun); every process
    group of the job inherits `timeout_minutes`."""
    global _timeout_minutes
    if dist.is_initialized():
        return
    _timeout_minutes = timeout_minutes
    # without torchrun: a 1-rank group on a free port (not written to os.environ, which child processes inherit)
    standalone = {} if "RANK" in os.environ else {
        "init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
    backend = "nccl" if has_cuda() else "gloo"
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **standalone)


def init(layout: Layout = Layout(), seed: int = 1234, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Everything a rank needs before building models: distributed, CPU layer, parallel state, seeds."""
    init_distributed(timeout_minutes)
    if not has_cuda():
        apply_cpu_compat()
        if layout.cp != 1:
            raise ValueError("--context-parallel-size > 1 needs CUDA (ring attention uses TE/NCCL)")
    initialize_parallel(layout)
    set_seed(seed)


def initialize_parallel(layout: Layout) -> None:
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if world % (layout.tp * layout.pp * layout.cp):
        raise ValueError(
            f"world size {world} is not divisible by TP*PP*CP = {layout.tp}*{layout.pp}*{layout.cp}"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        distributed_timeout_minutes=max(1, round(_timeout_minutes)),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
    )


def set_seed(seed: int) -> None:
    """Python/numpy/torch seeds plus Megatron's TP-aware RNG streams (seed + 100 * pp_rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if has_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        _install_cpu_rng_tracker(seed)


def make_process_groups(tp: int, pp: int = 1):
    """A ProcessGroupCollection for a second model (the teacher) with its own TP x PP layout.

    Rank order follows Megatron's: tp fastest, then dp, then pp. Every rank must call this
    collectively, in the same order. The teacher needs no DP/optimizer groups; `dp` is still set so
    it can split the batch across its replicas.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ValueError(f"teacher TP*PP = {tp}*{pp} does not divide the world size {world}")
    dp = world // (tp * pp)

    def rank_of(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    def make(groups: list[list[int]]):
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = g
        return mine

    tp_groups = [[rank_of(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    pp_groups = [[rank_of(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    dp_groups = [[rank_of(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    mp_groups = [[rank_of(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)]
    embd_groups = [sorted({rank_of(0, d, t), rank_of(pp - 1, d, t)}) for d in range(dp) for t in range(tp)]
    single = [[r] for r in range(world)]

    tp_g, pp_g, dp_g, mp_g = make(tp_groups), make(pp_groups), make(dp_groups), make(mp_groups)
    embd_g, single_g = make(embd_groups), make(single)
    return ProcessGroupCollection(
        tp=tp_g, pp=pp_g, mp=mp_g, embd=embd_g, pos_embd=single_g if pp == 1 else embd_g, cp=single_g,
        tp_cp=tp_g, dp=dp_g, dp_cp=dp_g, ep=single_g, expt_tp=tp_g, tp_ep=tp_g, tp_ep_pp=mp_g,
        tp_dp_cp=make([[rank_of(p, d, t) for d in range(dp) for t in range(tp)] for p in range(pp)]),
        expt_dp=dp_g,
    )


def student_process_groups():
    """The student's ProcessGroupCollection, taken from Megatron's global parallel state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


class CollectiveTimeoutError(RankLocalError):
    """A rank waited for the others longer than --distributed-timeout-minutes (one line from the CLI wrapper)."""


def wait_for_all(key: str, *, since: float, what: str) -> None:
    """A barrier through the job's TCP store that gives up with a clear message instead of a watchdog trace: each
    rank checks in under `key`, the last one sets `key/all`, and every rank waits on that key (no polling) until
    `since + --distributed-timeout-minutes` (`since` is a `time.monotonic()` stamp of when `what` started). Ranks
    wait here, not inside a collective, while others still generate."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    import time

    store = dist.distributed_c10d._get_default_store()
    deadline, world = since + 60.0 * _timeout_minutes, dist.get_world_size()
    if store.add(key, 1) == world:
        store.set(f"{key}/all", "1")
    try:
        store.wait([f"{key}/all"], datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
    except dist.DistStoreError:
        if time.monotonic() < deadline:
            raise
        raise CollectiveTimeoutError(
            f"{what} did not finish on every rank within --distributed-timeout-minutes={_timeout_minutes:g} "
            f"({store.add(key, 0)} of {world} ranks done); raise the flag for longer rollouts or lower "
            "--max-response-len / --rollout-batch-size") from None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
