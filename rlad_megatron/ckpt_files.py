"""File-level completeness of checkpoint directories, checked before any model is built (no tensor is read).

A Megatron `dist_checkpointing` directory in the torch_dist format holds `metadata.json` (backend), `.metadata`
(torch.distributed.checkpoint's pickled index: for every tensor shard its file, offset and length),
`__<rank>_<i>.distcp` shard files and `common.pt`. A shard shorter than the largest `offset + length` the
index lists for it is truncated: loading it fails deep inside torch with `CheckpointException ... EOFError`.
The functions return a one-line problem naming the file, or None; callers raise their own error type.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

TORCH_DIST_METADATA = ".metadata"
BACKEND_FILE = "metadata.json"
COMMON_FILE = "common.pt"


def json_problem(path: Path) -> str | None:
    """`path` is missing or not valid JSON (a write cut short)."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{path}: not valid JSON ({e}); the file is truncated or corrupt"
    return None


def torch_file_problem(path: Path) -> str | None:
    """`path` is missing or not a complete `torch.save` file (a zip archive with its central directory)."""
    if not path.is_file():
        return f"{path}: missing"
    if not zipfile.is_zipfile(path):
        return f"{path}: not a complete torch.save file ({path.stat().st_size} bytes); the file is truncated or corrupt"
    return None


def shard_extents(dist_dir: Path) -> dict[str, int]:
    """Shard file name -> bytes the torch_dist index needs in it (largest `offset + length`)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(dist_dir)).read_metadata()
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return ends


def dist_checkpoint_problem(dist_dir: str | Path) -> str | None:
    """The first missing or truncated file of the `dist_checkpointing` directory `dist_dir`, or None."""
    d = Path(dist_dir)
    if not d.is_dir():
        return f"{d}: missing directory"
    problem = json_problem(d / BACKEND_FILE)
    if problem:
        return problem
    backend = json.loads((d / BACKEND_FILE).read_text()).get("sharded_backend")
    if backend != "torch_dist":  # other backends (zarr) keep no byte index to check against
        return None
    index = d / TORCH_DIST_METADATA
    if not index.is_file():
        return f"{index}: missing"
    try:
        extents = shard_extents(d)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the index file is broken
        return f"{index}: unreadable ({type(e).__name__}: {e}); the file is truncated or corrupt"
    for name, need in sorted(extents.items()):
        shard = d / name
        if not shard.is_file():
            return f"{shard}: missing (listed in {index.name})"
        size = shard.stat().st_size
        if size < need:
            return f"{shard}: truncated ({size} bytes, {index.name} needs {need})"
    return torch_file_problem(d / COMMON_FILE)
