"""An SGLang HTTP server this process launches (`python -m sglang.launch_server`) and can restart.

The server runs in its own session (so `stop` takes down its children too) and logs to `log_path` if given; it
counts as up once `GET /health` answers 200, and a child that exits during start-up raises `EngineDiedError` with
its log tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rlad_megatron.rollout.sglang.args import server_cli_argv
from rlad_megatron.rollout.sglang.transport import EngineDiedError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `python -m sglang.launch_server` child this process started (so it can restart it)."""

    def __init__(self, server_kwargs: dict, *, host: str = "127.0.0.1", port: int | None = None,
                 env: dict | None = None, log_path: str | os.PathLike | None = None,
                 startup_timeout_s: float = 600.0) -> None:
        self.server_kwargs = {k: v for k, v in server_kwargs.items() if k not in ("host", "port")}
        self.host, self.port = host, port or free_port()
        # not torchrun's agent store (see colocated.LocalTransport._start): the server's ranks host their own
        self.env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k != "TORCHELASTIC_USE_AGENT_STORE"}
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
