"""Many threads generating on one in-process `sglang.Engine` at once.

`sglang.Engine` is asyncio inside: its tokenizer manager sends requests to the scheduler and receives results on one
event loop (`engine.loop`), and its blocking methods (`generate`, `update_weights_from_tensor`, `flush_cache`, ...)
each run that loop until their own request is answered, so two threads calling them at once collide ("this event
loop is already running") and one thread only ever has one request in flight. `LoopPump` runs the loop in a helper
thread while generation coroutines (`engine.async_generate`) are in flight, submitted from any thread with
`asyncio.run_coroutine_threadsafe`: all of them reach the scheduler together and are batched continuously. When the
last one is done the loop stops, so the blocking methods can run it again (`paused()`, also serialised); a
generation submitted meanwhile waits until they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class LoopPump:
    """Runs `loop` in a helper thread exactly while coroutines submitted through `run` are in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._cv = threading.Condition()
        self._sync_lock = threading.Lock()
        self._inflight = 0
        self._paused = 0
        self._thread: threading.Thread | None = None
        self.peak_inflight = 0  # most coroutines in flight at once (how much the engine could batch)

    def run(self, make_coro: Callable[[], Awaitable[T]]) -> T:
        """Await `make_coro()` on the loop from this (any non-loop) thread; blocks until it is done."""
        with self._cv:
            while self._paused:
                self._cv.wait()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="sglang-loop", daemon=True)
                self._thread.start()
            self._inflight += 1
            self.peak_inflight = max(self.peak_inflight, self._inflight)
        try:
            return asyncio.run_coroutine_threadsafe(make_coro(), self.loop).result()
        finally:
            with self._cv:
                self._inflight -= 1
                if self._inflight == 0:
                    self._stop()
                    self._cv.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The loop is idle (no generation in flight, none starts) inside: for the engine's blocking methods."""
        with self._sync_lock:
            with self._cv:
                while self._inflight:
                    self._cv.wait()
                self._paused += 1
            try:
                yield
            finally:
                with self._cv:
                    self._paused -= 1
                    self._cv.notify_all()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join()
