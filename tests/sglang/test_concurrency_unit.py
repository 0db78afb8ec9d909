"""Many requests in flight, without sglang: `LoopPump` (concurrent coroutines on one engine's event loop, blocking
calls in between) and `HTTPTransport`'s generation (one request per sample, least-outstanding over servers, the
router's workers) against small local HTTP servers that stand in for SGLang."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlad_megatron.rollout.sglang.loop_pump import LoopPump
from rlad_megatron.rollout.sglang.remote import HTTPTransport, worker_urls

# --------------------------------------------------------------------------------------------------- LoopPump


class AsyncEngine:
    """Stands in for `sglang.Engine`: `async_generate` awaits on the engine's loop; counts requests in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop, self.seconds = loop, seconds
        self.inflight = self.peak = 0

    async def async_generate(self, i: int) -> int:
        assert asyncio.get_running_loop() is self.loop
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        await asyncio.sleep(self.seconds)
        self.inflight -= 1
        return i

    def blocking_call(self) -> str:  # like Engine.flush_cache: runs the loop itself
        return self.loop.run_until_complete(asyncio.sleep(0, result="done"))


def test_loop_pump_runs_requests_from_many_threads_together_and_blocking_calls_in_between():
    loop = asyncio.new_event_loop()
    eng = AsyncEngine(loop, seconds=0.3)
    pump = LoopPump(loop)
    results = {}

    def worker(i: int) -> None:
        results[i] = pump.run(lambda: eng.async_generate(i))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert results == {i: i for i in range(8)} and eng.peak == 8 and pump.peak_inflight == 8
    assert wall < 4 * 0.3, wall  # serialised it would take 8 x 0.3 s
    with pump.paused():  # the loop is stopped: the engine's own blocking methods can run it
        assert eng.blocking_call() == "done"
    assert pump.run(lambda: eng.async_generate(9)) == 9  # and the pump starts it again afterwards
    loop.close()


def test_loop_pump_holds_generation_back_while_a_blocking_call_runs():
    loop = asyncio.new_event_loop()
    eng = AsyncEngine(loop, seconds=0.0)
    pump = LoopPump(loop)
    order = []
    with pump.paused():
        t = threading.Thread(target=lambda: order.append(pump.run(lambda: eng.async_generate(1))))
        t.start()
        time.sleep(0.2)
        order.append("blocking call done")
    t.join(5)
    assert order == ["blocking call done", 1]
    loop.close()


# ------------------------------------------------------------------------------------------- HTTP generation


class FakeServer:
    """A local HTTP server that answers like SGLang's /server_info and /generate (one prompt per request, after
    `delay` seconds), or like sglang-router's /workers."""

    def __init__(self, delay: float = 0.0, workers: list[str] | None = None) -> None:
        self.bodies: list = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/workers" and workers is not None:
                    self._send({"workers": [{"url": u, "model_id": "m"} for u in workers], "total": len(workers)})
                elif self.path == "/server_info" and workers is None:
                    self._send({"tp_size": 1, "version": "0.5.23", "model_path": "none"})
                else:
                    self.send_error(404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                time.sleep(delay)
                ids = body["input_ids"]
                self._send({"output_ids": [ids[-1] + 1], "meta_info": {
                    "output_token_logprobs": [[-0.5, ids[-1] + 1, None]], "finish_reason": {"type": "length"},
                    "weight_version": outer.url}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(**kw) -> FakeServer:
        made.append(FakeServer(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_one_request_per_sample_balanced_over_servers_and_in_flight_together(servers):
    a, b = servers(delay=0.2), servers(delay=0.2)
    t = HTTPTransport([a.url, b.url], max_requests=64)
    prompts = [[i, i + 1] for i in range(16)]
    t0 = time.perf_counter()
    outs = t.generate(prompts, [{"max_new_tokens": 1}] * 16, return_logprob=True)
    wall = time.perf_counter() - t0
    assert [o["output_ids"] for o in outs] == [[p[-1] + 1] for p in prompts]  # results in row order
    # equal servers share the requests (exactly 8/8 unless a busy box finishes some before others are sent)
    assert len(a.bodies) + len(b.bodies) == 16 and min(len(a.bodies), len(b.bodies)) >= 5, (len(a.bodies),
                                                                                           len(b.bodies))
    assert all(isinstance(x["input_ids"][0], int) and x["return_logprob"] is True for x in a.bodies + b.bodies)
    assert t.served == {a.url: len(a.bodies), b.url: len(b.bodies)} and t.outstanding == {a.url: 0, b.url: 0}
    assert wall < 16 * 0.2 / 2, wall  # in flight together, not one after the other
    t.close()


def test_least_outstanding_sends_new_requests_to_the_free_server(servers):
    slow, fast = servers(delay=1.0), servers(delay=0.0)
    t = HTTPTransport([slow.url, fast.url], max_requests=2)
    t.generate([[1, 2]] * 12, [{"max_new_tokens": 1}] * 12)
    # two in flight: the slow server holds its first request for 1 s, so every later one finds the fast server
    # with fewer outstanding
    assert len(slow.bodies) == 1 and len(fast.bodies) == 11, (len(slow.bodies), len(fast.bodies))
    t.close()


def test_router_generation_and_its_workers_for_weight_calls(servers):
    a, b = servers(), servers()
    router = servers(workers=[a.url, b.url])
    router.httpd.RequestHandlerClass.do_POST = a.httpd.RequestHandlerClass.do_POST  # it answers /generate itself
    t = HTTPTransport(router_url=router.url)
    assert t.urls == [a.url, b.url] and t.tp_sizes == [1, 1]
    outs = t.generate([[5]] * 4, [{"max_new_tokens": 1}] * 4)
    assert len(outs) == 4 and t.served == {router.url: 4} and not b.bodies
    t.close()
    assert worker_urls({"urls": ["http://x:1"]}) == ["http://x:1"] == worker_urls(["http://x:1"])


def test_remote_needs_servers():
    with pytest.raises(ValueError, match="--sglang-server-url"):
        HTTPTransport([])
