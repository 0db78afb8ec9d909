"""Push HF-named full tensors (exported from Megatron shards by `rlad_megatron.convert`) into a rollout engine.

`push_weights` = cast to the engine's dtype -> size-bounded buckets -> one `update_weights` call per bucket inside
a `begin_weight_update` / `end_weight_update` session. The input iterator is consumed lazily, so at most one
bucket of exported tensors is alive at a time. `FlattenedBucket` packs a bucket into one contiguous byte buffer
(SGLang's multi-dtype `FlattenedTensorBucket` idea) for backends that ship one flat tensor per bucket.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from rlad_megatron.rollout.base import RolloutEngine

ALIGN_BYTES = 16  # every tensor starts at a multiple of this in the flat buffer, so `.view(dtype)` is legal


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors, in order, into buckets of at most `bucket_bytes` bytes.

    A tensor larger than `bucket_bytes` gets a bucket of its own. Empty input yields no bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = tensor_bytes(t)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a flat bucket: bytes [offset, offset + numel * itemsize) of the buffer.

    Maps 1:1 onto SGLang's `FlattenedTensorMetadata(name, shape, dtype, start_idx=offset,
    end_idx=offset + nbytes, numel=nbytes)` for its uint8 (multi-dtype) buckets.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class FlattenedBucket:
    """One contiguous uint8 buffer [total_bytes] holding several tensors of any dtypes, plus their metadata."""

    def __init__(self, flat: torch.Tensor, metadata: list[TensorMeta]) -> None:
        if flat.dtype != torch.uint8 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("FlattenedBucket: flat must be a contiguous 1-D uint8 tensor")
        end = max((m.offset + m.nbytes for m in metadata), default=0)
        if end > flat.numel():
            raise ValueError(f"FlattenedBucket: metadata needs {end} bytes, buffer has {flat.numel()}")
        self.flat = flat
        self.metadata = metadata

    @staticmethod
    def layout(
        named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
    ) -> tuple[list[TensorMeta], int]:
        """Metadata for packing `named_tensors` (floating ones cast to `dtype`) -> (metadata, buffer bytes)."""
        metadata, offset = [], 0
        for name, t in named_tensors:
            out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
            meta = TensorMeta(name, tuple(t.shape), out_dtype, offset, t.numel())
            metadata.append(meta)
            offset += -(-meta.nbytes // ALIGN_BYTES) * ALIGN_BYTES
        return metadata, offset

    @classmethod
    def from_named_tensors(
        cls, named_tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None, device: torch.device | str | None = None,
    ) -> FlattenedBucket:
        """Pack tensors (any layout) into one buffer; floating tensors are cast to `dtype` during the copy.

        `out`: a reusable contiguous 1-D uint8 staging buffer (the bucket is `out[:needed]`); it avoids a fresh
        allocation per bucket. Otherwise a buffer is allocated on `device` (default: the first tensor's).
        """
        items = list(named_tensors)
        metadata, total = cls.layout(items, dtype)
        if out is not None:
            if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.numel() < total:
                raise ValueError(f"FlattenedBucket: out must be a contiguous 1-D uint8 tensor of >= {total} bytes")
            flat = out[:total]
        else:
            flat = torch.empty(total, dtype=torch.uint8, device=device or (items[0][1].device if items else "cpu"))
        bucket = cls(flat, metadata)
        for (_, t), view in zip(items, bucket.views(), strict=True):
            view.copy_(t)
        return bucket

    def views(self) -> list[torch.Tensor]:
        """Tensors reconstructed as views into `flat` (no copy), in metadata order."""
        return [
            self.flat[m.offset : m.offset + m.nbytes].view(m.dtype).view(m.shape) for m in self.metadata
        ]

    def to_named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(m.name, v) for m, v in zip(self.metadata, self.views(), strict=True)]

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


@dataclass
class SyncStats:
    bytes: int  # bytes sent (after the cast)
    tensors: int
    buckets: int
    seconds: float  # begin -> end, wall clock

    @property
    def gib_per_s(self) -> float:
        return self.bytes / 2**30 / self.seconds if self.seconds > 0 else float("inf")


def cast_named_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Lazily cast floating tensors to `dtype` (no copy when already there); others pass through."""
    for name, t in named_tensors:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        yield name, t.detach()


def push_weights(
    engine: RolloutEngine,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    version: str,
    bucket_bytes: int = 512 * 2**20,
    dtype: torch.dtype | None = None,
) -> SyncStats:
    """Send a full set of HF-named weights to `engine` in one session and label it `version`.

    `dtype` (cast target for floating tensors) defaults to `engine.update_dtype`, read once the session is open
    (an engine TP peer learns it from its leader then). On an error the exception propagates and the session is
    left to the engine (its `end_weight_update` would refuse an incomplete set); a later push starts a fresh session.
    """
    t0 = time.perf_counter()
    n_bytes = n_tensors = n_buckets = 0
    engine.begin_weight_update()
    if dtype is None:
        dtype = getattr(engine, "update_dtype", None)
    for bucket in iter_buckets(cast_named_tensors(named_tensors, dtype), bucket_bytes):
        engine.update_weights(bucket)
        n_buckets += 1
        n_tensors += len(bucket)
        n_bytes += sum(tensor_bytes(t) for _, t in bucket)
    engine.end_weight_update(version)
    return SyncStats(bytes=n_bytes, tensors=n_tensors, buckets=n_buckets, seconds=time.perf_counter() - t0)
