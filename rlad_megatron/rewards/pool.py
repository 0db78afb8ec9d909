"""Reward scoring in worker processes, one sample at a time, with a per-sample deadline that kills a hung worker.

`RewardPool(n).submit(name, response, sample, timeout=t)` returns a `Future[float]`. A manager thread hands each
job to an idle worker and waits for results or the earliest deadline (`multiprocessing.connection.wait`). A job
still running `t` seconds after it was handed over resolves to 0.0 (its `on_timeout` callback is called) and its
worker is killed (SIGKILL: a catastrophic C regex cannot be interrupted any other way) and replaced; the other
workers keep going. `ProcessPoolExecutor` cannot do this: it has no way to stop one running task.

Workers receive the reward *name* and resolve it with `get_reward_fn` themselves, so only names and picklable
`PromptSample`s cross the process boundary. The first job of a reward name in a worker imports its modules
(`warm_up`); its deadline starts only once that is done. Scoring runs on each worker's main thread, where
math-verify's `signal.alarm` timeouts work. Workers use the `spawn` start method by default (safe after
torch/CUDA/threads in the parent); with spawn the parent's `__main__` is re-imported in each worker, so entry
scripts need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Self

from rlad_megatron.data.prompts import PromptSample

RESOLVE_ALLOWANCE_S = 120.0  # first job of a reward name in a worker: time to import its modules
MAX_START_FAILURES = 3  # workers that die before they are ready: then the pool fails its jobs


@dataclass
class Job:
    """One sample to score: the reward (name + options), the response, its sample and the deadline rule."""

    name: str
    response: str
    sample: PromptSample
    format_reward: float = 0.0
    partial_credit: bool = False
    timeout: float | None = None  # seconds from the start of scoring; None = no limit
    on_timeout: Callable[[], None] | None = None
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple[str, float, bool]:
        return self.name, self.format_reward, self.partial_credit


def settle(job: Job, ok: bool, value: Any) -> None:
    """Resolve `job.future` with a score (float) or an exception, unless it is already resolved or cancelled."""
    try:
        if ok:
            job.future.set_result(float(value))
        else:
            job.future.set_exception(value)
    except InvalidStateError:
        pass


def settle_timeout(job: Job) -> None:
    """A job past its deadline scores 0.0 and is counted by its `on_timeout` callback."""
    if job.future.done():
        return
    if job.on_timeout is not None:
        job.on_timeout()
    settle(job, True, 0.0)


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any unpicklable exception is reported by its text
        return RuntimeError(f"{type(err).__name__}: {err}")


def _worker_main(conn: Connection) -> None:
    """Worker loop: ("ready") once imported, then per job ("resolved") for a new reward name, ("ok", value) or
    ("err", exception). A None message or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    from rlad_megatron.rewards.registry import get_reward_fn, warm_up

    fns: dict[tuple[str, float, bool], Callable[[str, PromptSample], float]] = {}
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, (name, format_reward, partial_credit), response, sample = msg
        try:
            key = (name, format_reward, partial_credit)
            if key not in fns:
                fns[key] = get_reward_fn(name, format_reward=format_reward, partial_credit=partial_credit)
                warm_up(name)
                conn.send(("resolved", job_id, None))
            conn.send(("ok", job_id, float(fns[key](response, sample))))
        except Exception as e:  # noqa: BLE001 - sent to the parent, raised from the job's future
            conn.send(("err", job_id, _picklable(e)))


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    ready: bool = False
    job: Job | None = None
    job_id: int = -1
    deadline: float | None = None
    resolved: set = field(default_factory=set)


class RewardPool:
    """`num_workers` reward processes fed one job at a time; reuse it across steps, `close()` at the end."""

    def __init__(self, num_workers: int, start_method: str = "spawn") -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.killed = 0  # workers killed at a deadline (and replaced)
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._pending: deque[Job] = deque()
        self._ids = itertools.count()
        self._closing = False
        self._start_failures = 0
        self._broken: BaseException | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._thread = threading.Thread(target=self._run, name="reward-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ public API

    def submit(self, name: str, response: str, sample: PromptSample, *, format_reward: float = 0.0,
               partial_credit: bool = False, timeout: float | None = None,
               on_timeout: Callable[[], None] | None = None) -> Future:
        """Queue one sample; the future resolves to its score (0.0 after `timeout` seconds of scoring)."""
        job = Job(name, response, sample, format_reward, partial_credit, timeout or None, on_timeout)
        with self._lock:
            if self._closing:
                raise RuntimeError("RewardPool is closed")
            if self._broken is not None:
                raise self._broken
            self._pending.append(job)
        self._wake()
        return job.future

    def score(self, name: str, responses: Sequence[str], samples: Sequence[PromptSample], *,
              format_reward: float = 0.0, partial_credit: bool = False, timeout: float | None = None) -> list[float]:
        """Rewards of `responses[i]` against `samples[i]`, in order (blocking)."""
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        from rlad_megatron.rewards.registry import get_reward_fn

        get_reward_fn(name, format_reward=format_reward, partial_credit=partial_credit)  # fail fast in the parent
        futures = [self.submit(name, r, s, format_reward=format_reward, partial_credit=partial_credit,
                               timeout=timeout) for r, s in zip(responses, samples, strict=True)]
        return [f.result() for f in futures]

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker has started (imports done); False if `timeout` seconds passed first. Call it
        before generation starts so the first rewards do not wait for worker start-up."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while not self._broken and sum(w.ready for w in self._workers) < self.num_workers:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._ready.wait(left)
        return True

    def close(self) -> None:
        """Finish the queued jobs (each bounded by its deadline), then stop the workers."""
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ manager thread

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full: the manager is awake anyway
            pass

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True, name="reward-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _replace(self, w: _Worker, *, kill: bool) -> None:
        if kill:
            w.proc.kill()
        w.proc.join(timeout=10)
        w.conn.close()
        self._workers[self._workers.index(w)] = self._spawn()

    def _dispatch(self) -> None:
        for w in self._workers:
            if not (w.ready and w.job is None):
                continue
            with self._lock:
                job = self._pending.popleft() if self._pending else None
            if job is None:
                return
            if job.future.cancelled():
                continue
            w.job, w.job_id = job, next(self._ids)
            try:
                w.conn.send((w.job_id, job.key, job.response, job.sample))
            except (OSError, ValueError):  # the worker died while idle: requeue the job on a fresh worker
                with self._lock:
                    self._pending.appendleft(job)
                w.job = None
                self._replace(w, kill=True)
                continue
            extra = 0.0 if job.key in w.resolved else RESOLVE_ALLOWANCE_S
            w.deadline = None if job.timeout is None else time.monotonic() + job.timeout + extra

    def _receive(self, w: _Worker) -> None:
        try:
            kind, job_id, value = w.conn.recv()
        except (EOFError, OSError):  # the worker died (crash, OOM kill): fail its job, start another worker
            job, code = w.job, w.proc.exitcode
            if not w.ready:
                self._start_failures += 1
                if self._start_failures >= MAX_START_FAILURES:
                    broken = RuntimeError(f"reward workers exit before they are ready (exit code {code}); "
                                          "run with --reward-workers 0 to see the error")
                    with self._ready:
                        self._broken = broken
                        self._ready.notify_all()
                    w.conn.close()
                    self._workers.remove(w)
                    return
            self._replace(w, kill=True)
            if job is not None:
                settle(job, False, RuntimeError(f"reward worker died (exit code {code}) while scoring with "
                                                f"{job.name!r}"))
            return
        if kind == "ready":
            with self._ready:
                w.ready = True
                self._ready.notify_all()
            return
        if w.job is None or job_id != w.job_id:
            return
        job = w.job
        if kind == "resolved":
            w.resolved.add(job.key)
            w.deadline = None if job.timeout is None else time.monotonic() + job.timeout
            return
        w.job, w.deadline = None, None
        settle(job, kind == "ok", value)

    def _expire(self) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.job is not None and w.deadline is not None and now >= w.deadline:
                job = w.job
                self.killed += 1
                self._replace(w, kill=True)
                settle_timeout(job)

    def _finished(self) -> bool:
        with self._lock:
            if self._broken is not None or not self._workers:
                failed, self._pending = list(self._pending), deque()
            else:
                failed = []
            done = self._closing and not self._pending and all(w.job is None for w in self._workers)
        for job in failed:
            settle(job, False, self._broken or RuntimeError("reward pool has no workers"))
        return done

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a manager bug must not leave callers waiting on futures forever
            with self._lock:
                self._broken = RuntimeError(f"reward pool manager failed: {type(e).__name__}: {e}")
                jobs, self._pending = list(self._pending), deque()
            for job in jobs + [w.job for w in self._workers if w.job is not None]:
                settle(job, False, self._broken)
            raise
        finally:
            self._stop_workers()

    def _loop(self) -> None:
        while not self._finished():
            self._dispatch()
            deadlines = [w.deadline for w in self._workers if w.job is not None and w.deadline is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = wait([w.conn for w in self._workers] + [self._wake_r], wait_s)
            for obj in ready:
                if obj == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                w = next((w for w in self._workers if w.conn is obj), None)
                if w is not None:
                    self._receive(w)
            self._expire()

    def _stop_workers(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
