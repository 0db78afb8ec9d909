"""Reward scoring in this process (`--reward-workers 0`) on one background thread, with a per-sample deadline.

Jobs (`pool.Job`) run one at a time, in submission order, on a daemon thread. A monitor thread watches the
running job's deadline (`timeout` seconds after it started): past it, the job's future resolves to 0.0, its
`on_timeout` callback is called, and a fresh thread takes over the queue. Python cannot kill a thread, so the
abandoned one keeps running until its call returns (its late result is dropped); it only stops when it does.
The deadline fires only when the monitor thread gets the GIL: a Python-level hang (a loop, `time.sleep`, I/O)
is bounded, but a C call that holds the GIL for its whole duration (a catastrophic `re` match) stalls every
thread; rewards that can hang that way need `--reward-workers > 0` (`pool.RewardPool` kills the process).
math-verify's own `signal.alarm` timeouts are off on this thread (see `rewards.math`); the deadline replaces them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from rlad_megatron.rewards.pool import Job, settle, settle_timeout
from rlad_megatron.rewards.registry import get_reward_fn


@dataclass
class _Runner:
    """One worker thread's state; `abandoned` once its job passed the deadline."""

    job: Job | None = None
    deadline: float | None = None
    abandoned: bool = False


class ThreadLane:
    """In-process, ordered reward scoring with deadlines; reuse it, `close()` at the end."""

    def __init__(self) -> None:
        self.abandoned = 0  # threads left running past a deadline
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._closing = False
        self._runner = self._start_runner()
        self._monitor = threading.Thread(target=self._watch, name="reward-lane-monitor", daemon=True)
        self._monitor.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closing:
                raise RuntimeError("ThreadLane is closed")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def close(self) -> None:
        """Finish the queued jobs (each bounded by its deadline), then stop the threads (not abandoned ones)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._monitor.join()

    def _start_runner(self) -> _Runner:
        runner = _Runner()
        threading.Thread(target=self._work, args=(runner,), name="reward-lane", daemon=True).start()
        return runner

    def _work(self, me: _Runner) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing and not me.abandoned:
                    self._cond.wait()
                if me.abandoned or not self._queue:
                    return
                job = self._queue.popleft()
                if job.future.cancelled():
                    continue
                me.job = job
                me.deadline = None if job.timeout is None else time.monotonic() + job.timeout
                self._cond.notify_all()  # the monitor picks up the deadline
            try:
                fn = get_reward_fn(job.name, format_reward=job.format_reward, partial_credit=job.partial_credit)
                ok, value = True, float(fn(job.response, job.sample))
            except Exception as e:  # noqa: BLE001 - raised from the job's future
                ok, value = False, e
            with self._cond:
                if me.abandoned:  # the monitor already resolved the future and started another thread
                    return
                me.job = me.deadline = None
                self._cond.notify_all()
            settle(job, ok, value)

    def _watch(self) -> None:
        while True:
            expired = None
            with self._cond:
                me = self._runner
                if self._closing and not self._queue and me.job is None:
                    return
                if me.job is None or me.deadline is None:
                    self._cond.wait()
                    continue
                remaining = me.deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                expired, me.abandoned = me.job, True
                self.abandoned += 1
                self._runner = self._start_runner()
            settle_timeout(expired)
