"""SGLang rollout engines behind `RolloutEngine`: colocated (in-process `sglang.Engine`) or remote (HTTP servers).

One class, `SGLangEngine`, holds the protocol logic (sampling-param mapping, log-prob triples -> `Rollout`,
prefill scoring, weight-update sessions, FP8 re-quantisation, restart-once) over one of two transports:

* `LocalTransport` (colocated, default on GPU): `sglang.Engine(enable_memory_saver=True, skip_tokenizer_init=True,
  ...)` on the training GPU of this process. A bucket is packed into SGLang's `FlattenedTensorBucket`, serialised
  with `MultiprocessingSerializer` (CUDA IPC handles once `monkey_patch_torch_reductions()` is applied; one payload
  per engine TP rank) and loaded with `update_weights_from_tensor(load_format="flattened_bucket", flush_cache=False)`.
* `HTTPTransport` (remote): generation through an `sglang-router` URL or round-robin over worker URLs
  (`requests`); weights by broadcast from this process (rank 0 of a group joined by every engine rank through
  `/init_weights_update_group`) with `/update_weights_from_distributed` (NCCL on GPU, gloo on CPU).

SGLang >= 0.5.21 refuses weight updates outside `begin_weight_update` / `end_weight_update`; both are sent when the
engine has them (feature-detected), older engines get client-side sessions only. Every network wait has a timeout
and a refused or failed update raises `WeightUpdateError` instead of hanging in a broadcast. Staged memory (slime):
`release_memory(all)` before training; `resume_memory(["weights"])`, push, `resume_memory(["kv_cache",
"cuda_graph"])`; the cache is flushed once after the update (see `rlad_megatron.offload.to_rollout`).

Importing this module needs neither sglang nor a GPU; building a colocated engine without sglang raises a
`RuntimeError` that says how to install it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from rlad_megatron.rollout.base import GREEDY_EPS, MEMORY_TAGS, Rollout, SamplingParams, WeightUpdateError
from rlad_megatron.rollout.sglang_args import import_sglang, parse_version, server_cli_argv

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "SGLang is not importable here. On a GPU machine: pip install -e .[gpu] (sglang, sglang-router, "
    "torch_memory_saver); for the CPU contract lane see docs/sglang_cpu_lane.md"
)
SESSION_MIN_VERSION = (0, 5, 21)  # begin/end_weight_update exist and are required from here on
BYTE_BUCKET_MIN_VERSION = (0, 5, 23)  # receiver's flattened bucket is a uint8 buffer (layout checked here)
ALL_TAGS = ("weights", "kv_cache", "cuda_graph")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16, "float32": torch.float32,
           "float": torch.float32}


class EngineDiedError(RuntimeError):
    """The SGLang engine (local scheduler processes or a remote server) is gone."""


class LogprobParityError(WeightUpdateError):
    """Engine log-probs after a weight sync differ from the trainer's by more than the tolerance."""


def require_sglang():
    """Import sglang or raise a RuntimeError with install instructions."""
    try:
        return import_sglang()
    except Exception as e:  # CUDA-less installs fail with OSError/RuntimeError, not only ImportError
        raise RuntimeError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e


def _check_result(result, what: str) -> None:
    """SGLang answers `(success, message)`, a dict with `success`, or an output object; raise if it failed."""
    if result is None:
        return
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict):
        ok, msg = result.get("success", True), result.get("message", "")
    else:
        ok, msg = getattr(result, "success", True), getattr(result, "message", "")
    if not ok:
        raise WeightUpdateError(f"SGLang {what} failed: {msg}")


# ------------------------------------------------------------------------------------------ weight-group setup


def init_weight_group(backend: str, address: str, port: int, world_size: int, rank: int, group_name: str,
                      timeout_s: float, prefer_sglang: bool = True):
    """Join a process group outside the default one (the trainer's side of SGLang's weight-update group).

    Uses SGLang's own `init_custom_process_group` when importable (and `prefer_sglang`), else the same torch
    recipe (TCP rendezvous, store prefixed by the group name, `_new_process_group_helper`), so the store keys
    match the engines' and a trainer without sglang installed can drive remote servers.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    helper = None
    for mod in ("sglang.srt.utils.common", "sglang.srt.utils") if prefer_sglang else ():
        try:
            helper = __import__(mod, fromlist=["init_custom_process_group"]).init_custom_process_group
            break
        except (ImportError, AttributeError):
            continue
        except Exception as e:  # noqa: BLE001 - sglang present but broken: use the plain torch recipe
            log.debug("sglang's init_custom_process_group unavailable: %s", e)
            break
    init_method = f"tcp://{address}:{port}"
    if helper is not None:
        return helper(backend=backend, init_method=init_method, timeout=timeout, world_size=world_size, rank=rank,
                      group_name=group_name)
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    opts = {"backend_options": None} if parse_version(torch.__version__) >= (2, 6) else {"pg_options": None}
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, timeout=timeout, **opts)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _abort_group(pg) -> None:
    """Best effort: drop a group whose broadcast may never complete (the peer refused the update)."""
    try:
        abort = getattr(pg, "abort", None)
        if callable(abort):
            abort()
    except Exception as e:  # noqa: BLE001 - aborting is a courtesy; the group is discarded either way
        log.debug("weight group abort failed: %s", e)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _address_towards(url: str) -> str:
    """This host's IP as seen from `url`'s host (the master address engines connect back to)."""
    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, urlparse(url).port or 80))
        return s.getsockname()[0]


# ---------------------------------------------------------------------------------------------- transports


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
            _check_result(self.engine.begin_weight_update(), "begin_weight_update")

    def end(self) -> None:
        if self.has_session:
            _check_result(self.engine.end_weight_update(), "end_weight_update")

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
            _check_result(result, "update_weights_from_tensor")
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
        _check_result(self.engine.flush_cache(), "flush_cache")

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
    _check_result(result, fn.__name__)


def _serializer():
    from sglang.srt.utils import MultiprocessingSerializer

    return MultiprocessingSerializer


def _patch_torch_reductions() -> None:
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:  # moved in some releases
        from sglang.srt.patch_torch import monkey_patch_torch_reductions
    monkey_patch_torch_reductions()


class ServerProcess:
    """A `python -m sglang.launch_server` child this process started (so it can restart it)."""

    def __init__(self, server_kwargs: dict, *, host: str = "127.0.0.1", port: int | None = None,
                 env: dict | None = None, log_path: str | os.PathLike | None = None,
                 startup_timeout_s: float = 600.0) -> None:
        self.server_kwargs = {k: v for k, v in server_kwargs.items() if k not in ("host", "port")}
        self.host, self.port = host, port or _free_port()
        self.env = dict(os.environ, **(env or {}))
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "sglang.launch_server", "--host", self.host, "--port", str(self.port),
                *server_cli_argv(self.server_kwargs)]
        with open(self.log_path or os.devnull, "ab") as out:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until_healthy(self.url, self.startup_timeout_s, proc=self.proc, log_path=self.log_path)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout_s)

    def restart(self) -> None:
        self.stop()
        self.start()


def wait_until_healthy(url: str, timeout_s: float, *, proc: subprocess.Popen | None = None,
                       log_path: Path | None = None) -> None:
    """Poll `GET url/health` until 200; raise EngineDiedError if `proc` exits or the timeout passes."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
            raise EngineDiedError(f"SGLang server at {url} exited with code {proc.returncode} during start-up\n{tail}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise EngineDiedError(f"SGLang server at {url} not healthy after {timeout_s:.0f} s")


class HTTPTransport:
    """SGLang servers over HTTP; weights broadcast from this process over a dedicated process group."""

    kind = "remote"

    def __init__(self, urls: Sequence[str], *, router_url: str | None = None, timeout_s: float = 600.0,
                 update_timeout_s: float = 300.0, sync_backend: str | None = None,
                 servers: Sequence[ServerProcess] = ()) -> None:
        import requests

        if not urls:
            raise ValueError("remote SGLang engine: no worker URLs (--sglang-urls)")
        self._requests = requests
        self.urls = [u.rstrip("/") for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.timeout_s, self.update_timeout_s = timeout_s, update_timeout_s
        self.sync_backend = sync_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.servers = list(servers)
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.urls)), thread_name_prefix="sglang-http")
        self._group = None
        self._group_name = ""
        self._rr = 0
        self._probe()

    def _probe(self) -> None:
        infos = [self._server_info(u) for u in self.urls]
        self.tp_sizes = [int(i.get("tp_size", 1)) for i in infos]
        versions = [parse_version(i.get("version", "0")) for i in infos]
        self.version = min(versions)
        self.has_session = self.version >= SESSION_MIN_VERSION
        self.byte_buckets = self.version >= BYTE_BUCKET_MIN_VERSION
        self.server_info = infos[0]

    def _server_info(self, url: str) -> dict:
        for path in ("/server_info", "/get_server_info"):
            try:
                r = self._requests.get(url + path, timeout=(10, 60))
            except self._requests.RequestException as e:
                raise EngineDiedError(f"SGLang server {url} unreachable: {e}") from e
            if r.status_code == 200:
                return r.json()
        raise EngineDiedError(f"SGLang server {url}: no /server_info ({r.status_code})")

    def _post(self, url: str, path: str, body: dict | None = None, *, timeout: float | None = None,
              what: str | None = None) -> dict | list | None:
        try:
            r = self._requests.post(url + path, json=body or {}, timeout=(10, timeout or self.timeout_s))
        except self._requests.ConnectionError as e:
            raise EngineDiedError(f"SGLang server {url} unreachable on {path}: {e}") from e
        except self._requests.Timeout as e:
            raise WeightUpdateError(f"SGLang {url}{path} timed out after {timeout or self.timeout_s:.0f} s") from e
        if r.status_code == 404 and what is None:
            return None
        try:
            data = r.json()
        except ValueError:
            data = {"success": r.status_code == 200, "message": r.text[:2000]}
        if r.status_code != 200:
            msg = data.get("message", data) if isinstance(data, dict) else data
            raise WeightUpdateError(f"SGLang {url}{path} -> HTTP {r.status_code}: {msg}")
        if isinstance(data, dict):
            _check_result(data, f"{url}{path}")
        return data

    def _all(self, path: str, body: dict | None = None, *, what: str | None = None) -> list:
        futures = [self._pool.submit(self._post, u, path, body, what=what) for u in self.urls]
        return [f.result() for f in futures]

    # generation
    def generate(self, input_ids: list[list[int]], sampling: list[dict], **kw) -> list[dict]:
        targets = [self.router_url] if self.router_url else self.urls
        n = len(input_ids)
        if n == 0:
            return []
        # contiguous chunks, one per target (the router balances its own chunk requests further)
        k = min(n, len(targets) if not self.router_url else max(1, min(n, 8)))
        bounds = [round(i * n / k) for i in range(k + 1)]
        futures = []
        for c in range(k):
            lo, hi = bounds[c], bounds[c + 1]
            body = {"input_ids": input_ids[lo:hi], "sampling_params": sampling[lo:hi], **_slice_kw(kw, lo, hi)}
            url = targets[(self._rr + c) % len(targets)]
            futures.append(self._pool.submit(self._post_generate, url, body))
        self._rr = (self._rr + k) % len(targets)
        out: list[dict] = []
        for f in futures:
            res = f.result()
            out.extend(res if isinstance(res, list) else [res])
        return out

    def _post_generate(self, url: str, body: dict):
        try:
            r = self._requests.post(url + "/generate", json=body, timeout=(10, self.timeout_s))
        except self._requests.ConnectionError as e:
            raise EngineDiedError(f"SGLang server {url} unreachable on /generate: {e}") from e
        if r.status_code != 200:
            raise RuntimeError(f"SGLang {url}/generate -> HTTP {r.status_code}: {r.text[:2000]}")
        return r.json()

    # weights
    def begin(self) -> None:
        if self.has_session:
            self._all("/begin_weight_update", {"selector": "all"}, what="begin_weight_update")

    def end(self) -> None:
        if self.has_session:
            self._all("/end_weight_update", {}, what="end_weight_update")

    def set_version(self, version: str) -> None:
        self._all("/update_weight_version", {"new_version": version, "abort_all_requests": False})

    def _ensure_group(self) -> None:
        if self._group is not None:
            return
        name = f"rlad_weights_{uuid.uuid4().hex[:8]}"
        address, port = _address_towards(self.urls[0]), _free_port()
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.urls))]
        futures = [
            self._pool.submit(self._post, url, "/init_weights_update_group",
                              {"master_address": address, "master_port": port, "rank_offset": off,
                               "world_size": world, "group_name": name, "backend": self.sync_backend},
                              timeout=self.update_timeout_s, what="init_weights_update_group")
            for url, off in zip(self.urls, offsets, strict=True)
        ]
        try:
            group = init_weight_group(self.sync_backend, address, port, world, 0, name, self.update_timeout_s)
        except Exception as e:
            raise WeightUpdateError(f"joining the SGLang weight-update group ({self.sync_backend}, "
                                    f"{address}:{port}, world {world}) failed: {e}") from e
        _wait_all(futures, self.update_timeout_s, "init_weights_update_group")
        self._group, self._group_name = group, name
        self._device = torch.device("cuda", torch.cuda.current_device()) if self.sync_backend == "nccl" else "cpu"

    def load_bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        import torch.distributed as dist

        self._ensure_group()
        if self.byte_buckets:
            # largest itemsize first: every offset in the receiver's uint8 buffer is then dtype-aligned
            named = sorted(named, key=lambda nt: -nt[1].element_size())
            flat = torch.cat([t.detach().to(self._device).contiguous().reshape(-1).view(torch.uint8)
                              for _, t in named])
            send, load_format = [flat], "flattened_bucket"
        else:
            send, load_format = [t.detach().to(self._device).contiguous() for _, t in named], None
        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "group_name": self._group_name, "flush_cache": False}
        if load_format:
            body["load_format"] = load_format
        futures = [self._pool.submit(self._post, u, "/update_weights_from_distributed", body,
                                     timeout=self.update_timeout_s, what="update_weights_from_distributed")
                   for u in self.urls]
        works = [dist.broadcast(t, src=0, group=self._group, async_op=True) for t in send]
        try:
            _wait_all(futures, self.update_timeout_s, "update_weights_from_distributed", works=works)
        except BaseException:
            # the engines did not all join the broadcast: this group may be stuck, start a new one next time
            group, self._group = self._group, None
            _abort_group(group)
            raise
        for w in works:
            w.wait()

    # memory and control
    def release(self, tags: Sequence[str]) -> None:
        self._all("/release_memory_occupation", {"tags": list(tags)}, what="release_memory_occupation")

    def resume(self, tags: Sequence[str]) -> None:
        self._all("/resume_memory_occupation", {"tags": list(tags)}, what="resume_memory_occupation")

    def flush(self) -> None:
        self._all("/flush_cache", {}, what="flush_cache")

    def alive(self) -> bool:
        for url in self.urls:
            try:
                if self._requests.get(url + "/health", timeout=(5, 30)).status_code != 200:
                    return False
            except self._requests.RequestException:
                return False
        return True

    def restart(self) -> None:
        if not self.servers:
            raise EngineDiedError(f"SGLang servers {self.urls} are down and were not started by this process")
        for s in self.servers:
            s.restart()
        self.urls = [s.url for s in self.servers]
        self._group = None
        self._probe()

    def close(self) -> None:
        if self._group is not None:
            try:
                self._all("/destroy_weights_update_group", {"group_name": self._group_name})
            except Exception as e:  # noqa: BLE001 - best effort at shutdown
                log.debug("destroy_weights_update_group failed: %s", e)
            self._group = None
        for s in self.servers:
            s.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _slice_kw(kw: dict, lo: int, hi: int) -> dict:
    return {k: (v[lo:hi] if isinstance(v, list) else v) for k, v in kw.items()}


def _wait_all(futures: list[Future], timeout_s: float, what: str, works: Sequence = ()) -> None:
    """Wait for HTTP calls (and broadcasts); fail fast on the first refusal, never past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        for f in futures:
            if f.done() and f.exception() is not None:
                e = f.exception()
                raise e if isinstance(e, WeightUpdateError) else WeightUpdateError(f"SGLang {what} failed: {e}")
        if all(f.done() for f in futures) and all(w.is_completed() for w in works):
            return
        if time.monotonic() > deadline:
            raise WeightUpdateError(f"SGLang {what} did not complete within {timeout_s:.0f} s")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------- the engine


def sampling_dict(sp: SamplingParams, *, seed: int | None = None) -> dict:
    """`SamplingParams` -> SGLang's sampling_params dict. Stop tokens stay in the output (no_stop_trim).

    SGLang's `ignore_eos` also disables `stop_token_ids`; the project's contract keeps them, so with both set the
    ids are not sent and `rollout_from_output` cuts at the first one instead (same tokens, same log-probs).
    """
    d = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
         "max_new_tokens": sp.max_new_tokens, "ignore_eos": sp.ignore_eos, "no_stop_trim": True}
    if sp.stop_token_ids and not sp.ignore_eos:
        d["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.stop:
        d["stop"] = list(sp.stop)
    if seed is not None:
        d["sampling_seed"] = int(seed)
    return d


def rollout_from_output(prompt: Sequence[int], out: dict, version: str,
                        client_stop_ids: Sequence[int] = ()) -> Rollout:
    """One SGLang result -> `Rollout`; ids and log-probs come from `meta_info.output_token_logprobs` triples
    (logprob, token_id, text), which keep the stop token even where `output_ids` was trimmed.
    `client_stop_ids`: stop tokens applied here (see `sampling_dict`)."""
    meta = out.get("meta_info", {})
    triples = meta.get("output_token_logprobs") or []
    ids = [int(t[1]) for t in triples]
    logprobs = [float(t[0]) for t in triples]
    if not triples and out.get("output_ids"):
        raise RuntimeError("SGLang returned tokens without log-probs (return_logprob was not honoured)")
    fr = meta.get("finish_reason") or {}
    reason = fr.get("type", "length") if isinstance(fr, dict) else str(fr)
    matched = fr.get("matched") if isinstance(fr, dict) else None
    cut = next((i for i, t in enumerate(ids) if t in set(client_stop_ids)), None)
    if cut is not None:
        ids, logprobs, reason, matched = ids[: cut + 1], logprobs[: cut + 1], "stop", ids[cut]
    return Rollout(prompt_ids=list(prompt), output_ids=ids, output_logprobs=logprobs, finish_reason=reason,
                   weight_version=version, text=out.get("text") or "" if cut is None else "",
                   meta={"prompt_tokens": len(prompt), "completion_tokens": len(ids), "matched": matched,
                         "engine_weight_version": meta.get("weight_version")})


def _tail_logprobs(entries: list, seq: Sequence[int], n: int) -> list:
    """The last `n` entries of SGLang's input log-prob list, checked against the last `n` tokens of `seq`.

    SGLang 0.5.23 reports the id of token `vocab_size - 1` as 0 in input-log-prob triples (the log-prob itself is
    that of the right token, checked against an HF forward), so a reported 0 is accepted for any token.
    """
    if n == 0:
        return []
    tail = entries[-n:]
    ok = len(tail) == n and all(e[0] is not None and int(e[1]) in (int(t), 0) for e, t in zip(tail, seq[-n:]))
    if not ok:
        raise RuntimeError(f"SGLang prefill log-probs do not line up with the scored tokens ({len(entries)} entries "
                           f"for {n} tokens)")
    return tail


class SGLangEngine:
    """`RolloutEngine` over SGLang. Build with `SGLangEngine.colocated(...)` or `SGLangEngine.remote(...)`.

    `fp8_block`: push block-FP8 weights (`rlad_megatron.fp8.quantize_named_tensors`) to an engine launched with an
    FP8 `quantization_config`. `on_restart(engine)`: called after the engine died and was restarted once (re-push
    the weights there); without it a restart with non-initial weights raises, since the rollouts would be stale.
    """

    def __init__(self, transport, *, vocab_size: int | None = None, update_dtype: torch.dtype | None = None,
                 fp8_block: tuple[int, int] | None = None, weight_version: str = "default",
                 deterministic: bool = False, on_restart: Callable[[SGLangEngine], None] | None = None,
                 max_restarts: int = 1) -> None:
        self._t = transport
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
    def colocated(cls, model_path: str | os.PathLike, *, server_kwargs: dict | None = None, **engine_kw) -> SGLangEngine:
        """In-process `sglang.Engine` on this process's GPU (`base_gpu_id` = current device), sized to share it
        with Megatron: `enable_memory_saver=True`, `mem_fraction_static=0.5`, token-id I/O; any `server_kwargs`
        (e.g. from `--sglang-*`) win. On a CPU-only machine: `device="cpu"`, torch-native attention, and
        `SGLANG_USE_CPU_ENGINE=1` (the contract lane)."""
        kw = {"model_path": str(model_path), "skip_tokenizer_init": True, "log_level": "error"}
        if torch.cuda.is_available():
            kw.update(enable_memory_saver=True, mem_fraction_static=0.5, base_gpu_id=torch.cuda.current_device())
        else:
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
            kw.update(device="cpu", attention_backend="torch_native", max_total_tokens=8192)
        kw.update(server_kwargs or {})
        transport = LocalTransport(kw)
        engine_kw.setdefault("vocab_size", _config_value(kw["model_path"], "vocab_size"))
        engine_kw.setdefault("update_dtype", _engine_dtype(kw.get("dtype"), kw["model_path"]))
        engine_kw.setdefault("deterministic", bool(kw.get("enable_deterministic_inference")))
        engine_kw.setdefault("weight_version", kw.get("weight_version", "default"))
        return cls(transport, **engine_kw)

    @classmethod
    def remote(cls, urls: Sequence[str], *, router_url: str | None = None, timeout_s: float = 600.0,
               update_timeout_s: float = 300.0, sync_backend: str | None = None,
               servers: Sequence[ServerProcess] = (), model_path: str | os.PathLike | None = None,
               **engine_kw) -> SGLangEngine:
        """SGLang servers at `urls` (and optionally an `sglang-router` at `router_url` for generation).
        `sync_backend`: the weight broadcast backend, nccl on GPU / gloo on CPU by default."""
        transport = HTTPTransport(urls, router_url=router_url, timeout_s=timeout_s, update_timeout_s=update_timeout_s,
                                  sync_backend=sync_backend, servers=servers)
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
        return [rollout_from_output(p, o, self._version, client_stops) for p, o in zip(prompts, outs, strict=True)]

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int],
              temperature: float = 1.0) -> list[list[float]]:
        """Prefill-only (`max_new_tokens=0`) log-probs of `sequences[i][prompt_lens[i]:]`.

        SGLang's input log-probs are raw `log_softmax(logits)`; for T != 1 the full distribution is requested
        (`top_logprobs_num` = vocab) and rescaled exactly, log_softmax(l / T) = log_softmax(logp_raw / T), which
        costs [tokens, vocab] floats per call: fine for probes and checks, not for bulk teacher scoring.
        """
        self._check_ready()
        if len(sequences) != len(prompt_lens):
            raise ValueError("score: sequences and prompt_lens differ in length")
        for s, p in zip(sequences, prompt_lens, strict=True):
            if not 1 <= p <= len(s):
                raise ValueError(f"score: prompt_len {p} outside [1, {len(s)}]")
        if temperature < 0:
            raise ValueError(f"score: temperature must be >= 0, got {temperature}")
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
    def begin_weight_update(self) -> None:
        if self._closed:
            raise WeightUpdateError("SGLangEngine is shut down")
        if self._session:
            log.warning("SGLangEngine: begin_weight_update() with a session open; closing it first")
            self._call(self._t.end, "end_weight_update")
            self._session = False
        self._call(self._t.begin, "begin_weight_update")
        self._session = True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named tensors (one flattened payload / broadcast per bucket)."""
        if not self._session:
            raise WeightUpdateError("update_weights must run between begin_weight_update() and end_weight_update()")
        named = [(n, t) for n, t in named_tensors]
        if not named:
            return
        if self.fp8_block is not None:
            from rlad_megatron.fp8 import quantize_named_tensors

            named = quantize_named_tensors(named, block=self.fp8_block)
        try:
            self._call(lambda: self._t.load_bucket(named), "update_weights")
        except WeightUpdateError:
            raise
        except Exception as e:
            raise WeightUpdateError(f"SGLang update_weights failed: {type(e).__name__}: {e}") from e

    def end_weight_update(self, version: str) -> None:
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

    # ------------------------------------------------------------------------------ memory/control
    def release_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        """Free engine GPU memory (engine must be idle); a no-op on CPU, as in SGLang."""
        self._check_tags(tags)
        self._call(lambda: self._t.release(tags), "release_memory")
        self._released.update(tags)

    def resume_memory(self, tags: Sequence[str] = ALL_TAGS) -> None:
        """Re-allocate released memory. Staged use: ["weights"] -> push -> ["kv_cache", "cuda_graph"]."""
        self._check_tags(tags)
        self._call(lambda: self._t.resume(tags), "resume_memory")
        self._released.difference_update(tags)
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


def check_logprob_parity(engine, probe_ids: Sequence[Sequence[int]], reference_logprobs, atol: float = 2e-2, *,
                         prompt_lens: Sequence[int] | None = None, temperature: float = 1.0) -> float:
    """Max |engine log-prob - reference| over the probe tokens; raises `LogprobParityError` above `atol`.

    `reference_logprobs[i]`: the trainer's (Megatron forward) log-probs of the last `len(reference_logprobs[i])`
    tokens of `probe_ids[i]` (a list/1-D tensor per row, or a [rows, n] tensor); `prompt_lens` defaults to
    `len(probe) - len(reference)`. Use it right after a weight sync: a mismatch means a conversion or sync bug.
    """
    refs = [torch.as_tensor(r, dtype=torch.float64).reshape(-1) for r in reference_logprobs]
    if len(refs) != len(probe_ids):
        raise ValueError(f"{len(probe_ids)} probes but {len(refs)} reference rows")
    if prompt_lens is None:
        prompt_lens = [len(p) - len(r) for p, r in zip(probe_ids, refs, strict=True)]
    got = engine.score(probe_ids, prompt_lens, temperature=temperature)
    diff = 0.0
    for i, (g, r) in enumerate(zip(got, refs, strict=True)):
        if len(g) != r.numel():
            raise ValueError(f"probe {i}: engine scored {len(g)} tokens, reference has {r.numel()}")
        if r.numel():
            d = (torch.tensor(g, dtype=torch.float64) - r).abs().max().item()
            diff = max(diff, d if math.isfinite(d) else math.inf)
    if diff > atol:
        raise LogprobParityError(f"engine vs trainer log-probs differ by {diff:.3g} > {atol:g} after a weight sync "
                                 f"(version {getattr(engine, 'weight_version', '?')})")
    return diff


def tail_logprobs(logits: torch.Tensor, ids: torch.Tensor, n: int, temperature: float = 1.0) -> torch.Tensor:
    """Reference log-probs of the last `n` tokens of `ids` [L] from logits [L, V] (row t predicts token t+1)."""
    lp = torch.log_softmax(logits[-n - 1:-1].double() / temperature, -1)
    return lp.gather(-1, ids[-n:].long()[:, None])[:, 0]


def make_sglang_engine(args, model_dir: str | os.PathLike | None = None) -> SGLangEngine:
    """The engine for `--rollout-engine sglang` (colocated) / `sglang-remote` (servers at `--sglang-urls`).

    Colocated: starts from `load_format="dummy"` (real weights arrive through the first sync), in the training
    dtype; `--sglang-*` flags override any default. `--rollout-fp8`: block-FP8 weights pushed to an engine whose
    model dir carries an FP8 `quantization_config` (`fp8.prepare_fp8_model_dir`).
    """
    from rlad_megatron.rollout.sglang_args import sglang_kwargs_from_args

    kwargs = sglang_kwargs_from_args(args)
    fp8_block = None
    if getattr(args, "rollout_fp8", False):
        from rlad_megatron.fp8 import prepare_fp8_model_dir

        fp8_block = tuple(getattr(args, "rollout_fp8_block", (128, 128)))
        if model_dir is not None:
            model_dir = prepare_fp8_model_dir(model_dir, Path(getattr(args, "output_dir", ".")) / "sglang_fp8_model",
                                              block=fp8_block)
    if getattr(args, "rollout_engine", "sglang") == "sglang-remote":
        return SGLangEngine.remote(getattr(args, "sglang_urls", []), router_url=getattr(args, "rollout_router_url", None),
                                   sync_backend=getattr(args, "rollout_sync_backend", None),
                                   update_timeout_s=getattr(args, "rollout_update_timeout", 300.0),
                                   model_path=model_dir, fp8_block=fp8_block)
    if model_dir is None:
        raise ValueError("--rollout-engine sglang needs a model dir (--student-hf or --tokenizer) for its config")
    defaults = {"load_format": "dummy", "random_seed": getattr(args, "seed", 0),
                "dtype": "bfloat16" if getattr(args, "bf16", False) else "float32"}
    if getattr(args, "rollout_stop", None):
        defaults["skip_tokenizer_init"] = False  # stop strings need the engine's tokenizer
    return SGLangEngine.colocated(model_dir, server_kwargs={**defaults, **kwargs}, fp8_block=fp8_block)


def add_rollout_engine_args(parser) -> None:
    """This engine's own flags (not SGLang server args): router, sync backend, update timeout."""
    g = parser.add_argument_group("SGLang rollout engine")
    g.add_argument("--rollout-router-url", default=None, help="sglang-router URL for generation (remote mode)")
    g.add_argument("--rollout-sync-backend", choices=["nccl", "gloo"], default=None,
                   help="remote weight broadcast backend (default: nccl with CUDA, gloo without)")
    g.add_argument("--rollout-update-timeout", type=float, default=300.0, help="seconds per weight-update call")


__all__ = [
    "EngineDiedError", "HTTPTransport", "LocalTransport", "LogprobParityError", "SGLangEngine", "ServerProcess",
    "add_rollout_engine_args", "check_logprob_parity", "init_weight_group", "make_sglang_engine", "require_sglang",
    "rollout_from_output", "sampling_dict", "tail_logprobs", "wait_until_healthy",
]
