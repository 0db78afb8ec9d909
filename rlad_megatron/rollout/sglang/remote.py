"""Remote transport: SGLang servers over HTTP, weights broadcast from this process.

Generation: one HTTP request per sample (many in flight from a thread pool), through an `sglang-router` when there
is one (it balances by cache affinity and load), else to the server with the fewest requests outstanding from this
process. The servers for weight and memory calls are the given URLs, or the router's workers (`GET /workers`).
Weights: this process is rank 0 of a process group that every engine rank joins through
`/init_weights_update_group` (NCCL on GPU, gloo on CPU); each bucket is announced with
`/update_weights_from_distributed` and broadcast (one uint8 buffer from SGLang 0.5.23, else one tensor per
parameter). Every network wait has a timeout, and a refused or failed update raises `WeightUpdateError` instead of
hanging in the broadcast; the group is then aborted and a fresh one is built for the next update.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlparse

import torch

from rlad_megatron.rollout.base import WeightUpdateError
from rlad_megatron.rollout.sglang.args import parse_version
from rlad_megatron.rollout.sglang.server import ServerProcess, free_port
from rlad_megatron.rollout.sglang.transport import EngineDiedError, check_result

log = logging.getLogger(__name__)

SESSION_MIN_VERSION = (0, 5, 21)  # begin/end_weight_update exist and are required from here on
BYTE_BUCKET_MIN_VERSION = (0, 5, 23)  # receiver's flattened bucket is a uint8 buffer (layout checked here)


def init_weight_group(backend: str, address: str, port: int, world_size: int, rank: int, group_name: str,
                      timeout_s: float, prefer_sglang: bool = True):
    """Join a process group outside the default one (the trainer's side of SGLang's weight-update group).

    Uses SGLang's own `init_custom_process_group` when importable (and `prefer_sglang`), else the same torch
    recipe (TCP store at `address:port` hosted by rank 0, prefixed by the group name, `_new_process_group_helper`),
    so the store keys match the engines' and a trainer without sglang installed can drive remote servers. Under
    torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`) torch's TCP rendezvous, which SGLang's helper uses, makes every
    rank a client of torchrun's own store, so nobody would host this group's store and the engines would wait
    forever: the store is then always created here, explicitly.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    helper = None
    under_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    for mod in ("sglang.srt.utils.common", "sglang.srt.utils") if prefer_sglang and not under_agent else ():
        try:
            helper = __import__(mod, fromlist=["init_custom_process_group"]).init_custom_process_group
            break
        except (ImportError, AttributeError):
            continue
        except Exception as e:  # noqa: BLE001 - sglang present but broken: use the plain torch recipe
            log.debug("sglang's init_custom_process_group unavailable: %s", e)
            break
    if helper is not None:
        return helper(backend=backend, init_method=f"tcp://{address}:{port}", timeout=timeout,
                      world_size=world_size, rank=rank, group_name=group_name)
    from torch.distributed import distributed_c10d as c10d

    store = torch.distributed.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                                       multi_tenant=True)
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


def _address_towards(url: str) -> str:
    """This host's IP as seen from `url`'s host (the master address engines connect back to)."""
    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, urlparse(url).port or 80))
        return s.getsockname()[0]


class HTTPTransport:
    """SGLang servers over HTTP; weights broadcast from this process over a dedicated process group."""

    kind = "remote"

    def __init__(self, urls: Sequence[str] = (), *, router_url: str | None = None, timeout_s: float = 600.0,
                 update_timeout_s: float = 300.0, sync_backend: str | None = None,
                 servers: Sequence[ServerProcess] = (), max_requests: int = 256) -> None:
        import requests

        self._requests = requests
        self.router_url = router_url.rstrip("/") if router_url else None
        self.timeout_s, self.update_timeout_s = timeout_s, update_timeout_s
        urls = list(urls) or (self._router_workers() if self.router_url else [])
        if not urls:
            raise ValueError("remote SGLang engine: no server URLs (--sglang-server-url) and no router workers "
                             "(--sglang-router-url)")
        if max_requests < 1:
            raise ValueError(f"remote SGLang engine: max_requests must be >= 1 (--rollout-max-requests), got "
                             f"{max_requests}")
        self.urls = [u.rstrip("/") for u in urls]
        self.sync_backend = sync_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.servers = list(servers)
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(self.urls)), thread_name_prefix="sglang-http")
        self._gen_pool = ThreadPoolExecutor(max_workers=max_requests, thread_name_prefix="sglang-gen")
        self._lock = threading.Lock()
        self._local = threading.local()
        self.outstanding = {u: 0 for u in self.urls}
        self.served = {u: 0 for u in ([self.router_url] if self.router_url else self.urls)}  # requests per target
        self._group = None
        self._group_name = ""
        self._probe()

    def _router_workers(self) -> list[str]:
        """The router's worker URLs (sglang-router 0.3: `GET /workers`; older: `GET /list_workers`)."""
        for path in ("/workers", "/list_workers"):
            try:
                r = self._requests.get(self.router_url + path, timeout=(10, 60))
            except self._requests.RequestException as e:
                raise EngineDiedError(f"sglang-router {self.router_url} unreachable: {e}") from e
            if r.status_code == 200:
                return worker_urls(r.json())
        raise ValueError(f"sglang-router {self.router_url}: no /workers list; pass --sglang-server-url for each "
                         "server")

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
            check_result(data, f"{url}{path}")
        return data

    def _all(self, path: str, body: dict | None = None, *, what: str | None = None) -> list:
        futures = [self._pool.submit(self._post, u, path, body, what=what) for u in self.urls]
        return [f.result() for f in futures]

    # generation
    def generate(self, input_ids: list[list[int]], sampling: list[dict], **kw) -> list[dict]:
        """One request per row, all in flight at once (up to the pool size); results in row order."""
        futures = [self._gen_pool.submit(self._generate_one, {"input_ids": ids, "sampling_params": sp,
                                                              **_row_kw(kw, i)})
                   for i, (ids, sp) in enumerate(zip(input_ids, sampling, strict=True))]
        out = []
        for f in futures:
            res = f.result()
            out.append(res[0] if isinstance(res, list) else res)
        return out

    def _pick(self) -> str:
        """The router, or the server with the fewest requests outstanding from here (ties: the least served)."""
        with self._lock:
            url = self.router_url or min(self.urls, key=lambda u: (self.outstanding[u], self.served[u]))
            if url in self.outstanding:
                self.outstanding[url] += 1
            self.served[url] = self.served.get(url, 0) + 1
        return url

    def _generate_one(self, body: dict):
        url = self._pick()
        session = getattr(self._local, "session", None)
        if session is None:  # one keep-alive connection pool per pool thread
            session = self._local.session = self._requests.Session()
        try:
            r = session.post(url + "/generate", json=body, timeout=(10, self.timeout_s))
        except self._requests.ConnectionError as e:
            raise EngineDiedError(f"SGLang server {url} unreachable on /generate: {e}") from e
        finally:
            if url in self.outstanding:
                with self._lock:
                    self.outstanding[url] -= 1
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
        address, port = _address_towards(self.urls[0]), free_port()
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
        self._gen_pool.shutdown(wait=False, cancel_futures=True)


def _row_kw(kw: dict, i: int) -> dict:
    return {k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()}


def worker_urls(listing) -> list[str]:
    """Worker URLs from a router's worker listing: `{"workers": [{"url": ...}, ...]}`, `{"urls": [...]}` or a
    plain list of URLs / worker dicts."""
    if isinstance(listing, dict):
        listing = listing.get("workers", listing.get("urls", []))
    urls = [w.get("url") if isinstance(w, dict) else w for w in listing]
    return [u for u in urls if isinstance(u, str) and u]


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
