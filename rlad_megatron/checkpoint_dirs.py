"""Training-checkpoint directories, files only (no model, no megatron import): the layout, completeness and
which step to resume from. `checkpoint` reads and writes the checkpoints themselves.

    save_dir/latest                     the step of the newest complete checkpoint
    save_dir/iter_{step:07d}/           one checkpoint (see `checkpoint` for its files)
    save_dir/.tmp_* / .del_*            a save or a delete in progress (never read)

Resuming (`resolve_resume`): `latest` names the checkpoint, which must be complete (else the broken file is
named); without `latest` (e.g. a directory copied without it) the newest complete `iter_*` is used and the
returned note says so. Completeness (`completeness_problem`) is checked from files alone, before any model is
built: the JSON files parse, every shard the torch_dist index lists has the bytes it needs, RNG files are whole.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from rlad_megatron.ckpt_files import dist_checkpoint_problem, json_problem, torch_file_problem
from rlad_megatron.errors import UserError

FORMAT_VERSION = 1
LATEST_FILE = "latest"
DIST_DIR = "dist"
RNG_DIR = "rng"
META_FILE = "rlad_meta.json"
TRAIN_STATE_FILE = "train_state.json"
SCHEDULER_FILE = "scheduler.json"
TMP_PREFIX = ".tmp_"
DELETE_PREFIX = ".del_"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or belongs to another model (a user error: the message names the
    file)."""


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def checkpoint_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / iter_dir_name(step)


def list_checkpoints(save_dir: str | Path) -> list[int]:
    """Steps of the `iter_*` directories under `save_dir`, ascending (complete when written by `save_checkpoint`;
    `completeness_problem` checks one)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name))]
    return sorted(steps)


def read_latest(save_dir: str | Path) -> int | None:
    """The step in `save_dir/latest`, or None when there is no pointer file."""
    path = Path(save_dir) / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected a step number, found {text!r}")
    return int(text)


def resolve_step(load_dir: str | Path) -> int | None:
    """The step to resume from: `latest` if its directory exists, else the newest `iter_*` (with a
    warning), else None."""
    step = read_latest(load_dir)
    if step is not None and checkpoint_dir(load_dir, step).is_dir():
        return step
    steps = list_checkpoints(load_dir)
    if step is not None:
        warnings.warn(
            f"{Path(load_dir) / LATEST_FILE} points to step {step} but {checkpoint_dir(load_dir, step)} does not "
            f"exist; using the newest complete checkpoint {steps[-1] if steps else None}",
            stacklevel=2,
        )
    return steps[-1] if steps else None


def completeness_problem(ckpt: str | Path) -> str | None:
    """The first missing or broken file of the checkpoint directory `ckpt` (`save_dir/iter_*`), or None."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return f"{ckpt}: no such checkpoint directory"
    for name in (META_FILE, TRAIN_STATE_FILE):
        problem = json_problem(ckpt / name)
        if problem:
            return problem
    if (ckpt / SCHEDULER_FILE).exists() and (problem := json_problem(ckpt / SCHEDULER_FILE)):
        return problem
    problem = dist_checkpoint_problem(ckpt / DIST_DIR)
    if problem:
        return problem
    world = json.loads((ckpt / META_FILE).read_text()).get("saved_layout", {}).get("world_size", 0)
    for rank in range(world):
        problem = torch_file_problem(ckpt / RNG_DIR / f"rank_{rank:05d}.pt")
        if problem:
            return problem
    return None


def check_complete(ckpt: str | Path) -> None:
    """Raise CheckpointError naming the first missing or broken file of the checkpoint directory `ckpt`."""
    problem = completeness_problem(ckpt)
    if problem:
        raise CheckpointError(f"{problem} (incomplete checkpoint)")


def resolve_resume(load_dir: str | Path) -> tuple[int | None, str]:
    """(step to resume from or None for a fresh start, a one-line note saying which and why). Files only: call it
    before building models. CheckpointError (naming the file) when `latest` is unreadable or names an incomplete
    checkpoint, or when every `iter_*` is incomplete."""
    root = Path(load_dir)
    latest, steps = read_latest(root), list_checkpoints(root)
    if latest is not None and checkpoint_dir(root, latest).is_dir():
        check_complete(checkpoint_dir(root, latest))
        return latest, f"resuming from {checkpoint_dir(root, latest)} (step {latest})"
    if not steps:
        if latest is not None:
            raise CheckpointError(f"{root / LATEST_FILE}: names step {latest} but {checkpoint_dir(root, latest)} "
                                  "does not exist and there is no other iter_* checkpoint")
        return None, f"{root}: no checkpoint yet (no {LATEST_FILE} file, no iter_* directory); starting at step 0"
    why = (f"{root / LATEST_FILE} names step {latest} but {iter_dir_name(latest)} does not exist"
           if latest is not None else f"{root} has no '{LATEST_FILE}' file")
    skipped = []
    for step in reversed(steps):
        problem = completeness_problem(checkpoint_dir(root, step))
        if problem is None:
            more = f" (skipped incomplete: {'; '.join(skipped)})" if skipped else ""
            return step, f"{why}; resuming from the newest complete checkpoint {iter_dir_name(step)} (step {step}){more}"
        skipped.append(problem)
    raise CheckpointError(f"{root}: no complete checkpoint ({why}): {'; '.join(skipped)}")
