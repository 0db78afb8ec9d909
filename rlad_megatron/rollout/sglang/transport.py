"""What `SGLangEngine` asks of a transport, and the two failure kinds a transport reports.

A transport moves requests, weights and memory calls to one SGLang deployment: `LocalTransport` (an in-process
`sglang.Engine`, `colocated`) or `HTTPTransport` (servers over HTTP, `remote`). It raises
`EngineDiedError` when the engine is gone (so `SGLangEngine` restarts it once) and `WeightUpdateError` when a call
was refused or failed (`check_result`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from rlad_megatron.rollout.base import WeightUpdateError


class EngineDiedError(RuntimeError):
    """The SGLang engine (local scheduler processes or a remote server) is gone."""


class Transport(Protocol):
    kind: str  # "colocated" | "remote", reported as `SGLangEngine.mode`
    version: tuple[int, ...]  # the SGLang version serving

    def generate(self, input_ids: list[list[int]], sampling: list[dict], **kw) -> list[dict]:
        """One SGLang result dict per row; list-valued `kw` are per row."""

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def load_bucket(self, named: list[tuple[str, torch.Tensor]]) -> None: ...
    def set_version(self, version: str) -> None: ...
    def release(self, tags: Sequence[str]) -> None: ...
    def resume(self, tags: Sequence[str]) -> None: ...
    def flush(self) -> None: ...
    def alive(self) -> bool: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...


def check_result(result, what: str) -> None:
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
