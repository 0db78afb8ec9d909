"""The training ranks of one colocated engine with tensor parallelism > 1: each engine TP rank loads its weights
from the GPU buffer of the training rank on its own GPU (slime's per-engine payload gather).

With `--rollout-num-gpus-per-engine N` the engine on ranks `[L, L + N)` is driven by its leader `L`; engine TP rank
`i` runs on the GPU of training rank `L + i`. During a weight update every one of those ranks packs the same bucket
(every rank holds the full HF tensors after the export) into its own buffer and serialises it (CUDA IPC handles on
GPU); the leader gathers the payloads over a gloo group of the engine's ranks, in TP-rank order, and hands SGLang
one payload per TP rank. Each step of a session is a collective of the group, with the same order on every rank:

    begin   leader opens the session        -> broadcasts its outcome and the push config (dtype, FP8 block)
    bucket  every rank packs its payload    -> gather to the leader -> leader loads -> broadcasts the outcome
    end     leader closes the session       -> broadcasts the outcome

A rank keeps its buffer until the outcome arrives, so the engine never reads freed memory. A failure on any rank is
broadcast, and every rank raises (`WeightUpdateError`) instead of waiting for a step that will never come.
`EngineRanks` is the group; `WeightPeer` is what a non-leader rank pushes into (it quacks like an engine for
`push_weights`); the leader's `SGLangEngine` calls `EngineRanks.lead`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlad_megatron.rollout.base import WeightUpdateError
from rlad_megatron.rollout.layout import EngineLayout

Pack = Callable[[list[tuple[str, torch.Tensor]]], tuple[list, Any]]  # bucket -> (payloads, keep-alive)


def bucket_digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """Names, shapes and dtypes of a bucket: every rank of an engine must send the same bucket in the same step."""
    h = hashlib.sha1()
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


@dataclass
class Contribution:
    """What one rank sends the leader for a bucket: the bucket's digest and its serialised payload(s), one per
    flattened group (None when packing failed there: `error` says why)."""

    rank: int
    digest: str | None
    payloads: list | None
    error: str | None = None


class EngineRanks:
    """The gloo group of one engine's training ranks (group rank = engine TP rank; the leader is group rank 0)."""

    def __init__(self, group, ranks: Sequence[int], rank: int) -> None:
        self.group, self.ranks, self.rank = group, list(ranks), rank
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not one of the engine's ranks {self.ranks}")

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    def _gather(self, mine: Contribution) -> list[Contribution] | None:
        out = [None] * self.size if self.is_leader else None
        dist.gather_object(mine, out, dst=self.leader, group=self.group)
        return out

    def _broadcast(self, status: dict | None) -> dict:
        box = [status]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def lead(self, consume: Callable[[list[Contribution] | None], Any], *, digest: str | None = None,
             info: dict | None = None, failed: BaseException | None = None) -> Any:
        """Leader side of one step: gather the peers' contributions (when `digest` is given: a bucket step), run
        `consume(peer_contributions)`, broadcast the outcome (with `info`), re-raise a failure. `failed`: the
        leader could not prepare the step; the peers still take part and learn why."""
        peers = None
        error = failed
        if digest is not None:
            got = self._gather(Contribution(self.rank, digest, None))
            peers = got[1:]
            bad = [c for c in peers if c.error or c.digest != digest]
            if bad and error is None:
                c = bad[0]
                error = WeightUpdateError(
                    f"rank {c.rank} of the engine on ranks {self.ranks} could not contribute its weight bucket: "
                    + (c.error or f"its bucket differs from the leader's (digest {c.digest} != {digest}): every "
                                  "rank must export the same tensors in the same order"))
        result = None
        if error is None:
            try:
                result = consume(peers)
            except BaseException as e:  # noqa: BLE001 - broadcast first so the peers do not hang, then re-raise
                error = e
        self._broadcast({"ok": error is None, "error": f"{type(error).__name__}: {error}" if error else "",
                         **(info or {})})
        if error is not None:
            raise error
        return result

    def follow(self, pack: Callable[[], tuple[str, list]] | None = None) -> dict:
        """Peer side of one step: contribute `pack()` -> (digest, payloads) when it is a bucket step, then wait for
        the leader's outcome (returned; a failure raises)."""
        error: BaseException | None = None
        if pack is not None:
            try:
                digest, payloads = pack()
                mine = Contribution(self.rank, digest, payloads)
            except BaseException as e:  # noqa: BLE001 - reported to the leader, re-raised below
                error, mine = e, Contribution(self.rank, None, None, f"{type(e).__name__}: {e}")
            self._gather(mine)
        status = self._broadcast(None)
        if error is not None:
            raise error
        if not status["ok"]:
            raise WeightUpdateError(f"weight update failed on the engine leader (rank {self.leader}): "
                                    f"{status['error']}")
        return status


def build_engine_ranks(layout: EngineLayout, rank: int) -> EngineRanks | None:
    """This rank's engine group (None with one rank per engine). Collective: every rank creates every engine's
    group, in engine order, as `new_group` requires."""
    if layout.gpus_per_engine == 1 or not dist.is_initialized():
        return None
    mine = None
    for e in range(layout.engines):
        ranks = layout.ranks(e)
        group = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = EngineRanks(group, ranks, rank)
    return mine


def check_local_tp(gpus_per_engine: int, local_rank: int, local_world: int) -> int:
    """The engine's first GPU (`base_gpu_id`) for a leader at `local_rank`: its TP ranks use the GPUs of the
    training ranks `[local_rank, local_rank + N)` of the same node, so N must divide the GPUs per node."""
    if local_world % gpus_per_engine:
        raise ValueError(f"--rollout-num-gpus-per-engine {gpus_per_engine} must divide the GPUs (ranks) per node "
                         f"({local_world}): a colocated engine's TP ranks use its own ranks' GPUs on one node")
    if local_rank % gpus_per_engine:
        raise ValueError(f"rank with LOCAL_RANK {local_rank} leads an engine but is not at a multiple of "
                         f"--rollout-num-gpus-per-engine {gpus_per_engine} on its node")
    return local_rank


class WeightPeer:
    """A non-leader rank's side of `push_weights`: it packs each bucket into its own buffer and contributes it to
    the leader (which loads it into this rank's engine TP rank), keeping the buffer until the leader's load is done.

    `pack(bucket) -> (payloads, keep_alive)` serialises a bucket (SGLang's flattened bucket + CUDA IPC by default,
    `colocated.pack_bucket`). The push config (dtype to cast to, FP8 block) arrives with the leader's `begin`.
    """

    receives_weights = True

    def __init__(self, ranks: EngineRanks, pack: Pack | None = None) -> None:
        if ranks.is_leader:
            raise ValueError("WeightPeer is for the engine's non-leader ranks")
        self.ranks = ranks
        self._pack = pack
        self.update_dtype: torch.dtype | None = None
        self.fp8_block: tuple[int, int] | None = None
        self.weight_version = "default"
        self.buckets = 0

    def begin_weight_update(self) -> None:
        status = self.ranks.follow()
        self.update_dtype = _dtype(status.get("update_dtype"))
        block = status.get("fp8_block")
        self.fp8_block = tuple(block) if block else None

    def update_weights(self, named_tensors) -> None:
        named = [(n, t) for n, t in named_tensors]
        if not named:
            return
        keep: list = []

        def pack() -> tuple[str, list]:
            items = named
            if self.fp8_block is not None:
                from rlad_megatron.rollout.sglang.fp8_weights import quantize_named_tensors

                items = quantize_named_tensors(items, block=self.fp8_block)
            payloads, alive = self._packer()(items)
            keep.append(alive)  # until the leader's outcome: the engine reads this rank's buffer
            return bucket_digest(items), payloads

        self.ranks.follow(pack)
        self.buckets += 1
        keep.clear()
        if named[0][1].is_cuda:  # drop the IPC handles the engine has closed, as the leader does
            torch.cuda.ipc_collect()

    def end_weight_update(self, version: str) -> None:
        self.ranks.follow()
        self.weight_version = str(version)

    def _packer(self) -> Pack:
        if self._pack is None:
            from rlad_megatron.rollout.sglang.colocated import pack_bucket

            self._pack = pack_bucket
        return self._pack


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name.removeprefix("torch.")) if name else None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None
