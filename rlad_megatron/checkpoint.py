"""Atomic, reshardable training checkpoints with Megatron `dist_checkpointing` (torch_dist).

Layout of one checkpoint, `save_dir/iter_{step:07d}/`:
```
dist/               model + optimizer sharded state (dist_checkpointing, torch_dist format)
rng/rank_00000.pt   per global rank: python/numpy/torch/cuda RNG + Megatron's RNG-tracker states
scheduler.json      OptimizerParamScheduler state
train_state.json    step, data position, ... (the trainer's dict)
rlad_meta.json      model identity (HF config, spec, padded vocab) + layout it was saved at
```
`save_dir/latest` holds the step of the newest complete checkpoint.

Directory layout, completeness checks and resume resolution (files only, no torch model) live in
`checkpoint_dirs`.

Atomicity: every rank writes into `save_dir/.tmp_iter_{step:07d}/`; after a barrier rank 0 renames it to
`iter_{step:07d}` (one `rename`) and only then replaces `latest` (temp file + `os.replace`). A crash at
any moment leaves the previous checkpoint and `latest` intact; an `iter_*` directory is complete by
construction (old ones are renamed away before they are deleted). Leftover temp directories are
removed by the next save and never read.

Resharding: the model (and the non-distributed optimizer, whose state is keyed like the model) loads at
any TP/PP. The DistributedOptimizer is saved `fully_reshardable` by default (reshards across TP/PP/DP;
the state is gathered on DP rank 0 to save); `dp_reshardable` saves in parallel but reshards only across DP.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from rlad_megatron import platform
from rlad_megatron.checkpoint_dirs import (  # noqa: F401 - re-exported: the checkpoint API lives here
    DELETE_PREFIX,
    DIST_DIR,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    RNG_DIR,
    SCHEDULER_FILE,
    TMP_PREFIX,
    TRAIN_STATE_FILE,
    CheckpointError,
    check_complete,
    checkpoint_dir,
    completeness_problem,
    iter_dir_name,
    list_checkpoints,
    read_latest,
    resolve_resume,
    resolve_step,
)
from rlad_megatron.checkpoint_optim import (
    is_distributed_optimizer,
    load_optimizer_state,
    optimizer_kind,
    prime_torch_adam_state,
)
from rlad_megatron.models.builder import Model

# test hook: seconds rank 0 sleeps after all ranks finished writing and before the rename
SLEEP_BEFORE_RENAME_ENV = "RLAD_CKPT_TEST_SLEEP_BEFORE_RENAME"
DEFAULT_OPTIM_SHARDING = "fully_reshardable"
OPTIM_SHARDING_TYPES = ("fully_reshardable", "dp_reshardable", "fully_sharded_model_space")
# ModelSpec fields that must agree between a checkpoint and the model it is loaded into
_IDENTITY_FIELDS = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "qk_layernorm",
    "tie_word_embeddings",
)


# --------------------------------------------------------------------------------------------------
# writing helpers
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (distcp shards are already synced by their writer)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    _write_file(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _write_latest(save_dir: Path, step: int) -> None:
    tmp = save_dir / f"{TMP_PREFIX}{LATEST_FILE}"
    _write_file(tmp, f"{step}\n".encode())
    os.replace(tmp, save_dir / LATEST_FILE)
    _fsync_dir(save_dir)


def _remove_dir(path: Path) -> None:
    """Rename out of the `iter_*` namespace first, so a crash mid-delete never leaves a partial `iter_*`."""
    trash = path.with_name(f"{DELETE_PREFIX}{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_stale(save_dir: Path) -> None:
    for p in save_dir.iterdir():
        if p.name.startswith((TMP_PREFIX, DELETE_PREFIX)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------------
# model identity, RNG, optimizer state
# --------------------------------------------------------------------------------------------------


def model_meta(model: Model) -> dict:
    """What identifies the model a checkpoint belongs to (plus the layout it was saved at, for info)."""
    spec = {f: getattr(model.spec, f) for f in _IDENTITY_FIELDS}
    return {
        "format_version": FORMAT_VERSION,
        "architecture": model.spec.architecture,
        "spec": spec,
        "padded_vocab": model.padded_vocab,
        "hf_config": model.spec.hf_config,
        "params_dtype": str(model.config.params_dtype),
        "saved_layout": {"tp": model.tp, "pp": model.pp, "world_size": _world()},
    }


def check_meta(meta_path: Path, model: Model) -> dict:
    """Raise CheckpointError naming `meta_path` when the checkpoint's model differs from `model`."""
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing; not an rlad_megatron checkpoint or an incomplete one")
    saved = json.loads(meta_path.read_text())
    mine = model_meta(model)
    diffs = [
        f"{k}: checkpoint={saved['spec'].get(k)!r} model={v!r}"
        for k, v in json.loads(json.dumps(mine["spec"])).items()
        if saved["spec"].get(k) != v
    ]
    if diffs:
        raise CheckpointError(f"{meta_path}: checkpoint is for another model ({'; '.join(diffs)})")
    if saved["padded_vocab"] != model.padded_vocab:
        raise CheckpointError(
            f"{meta_path}: checkpoint padded vocab {saved['padded_vocab']} != model's {model.padded_vocab}; "
            f"build the model with padded_vocab={saved['padded_vocab']}"
        )
    return saved


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if platform.has_cuda() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and platform.has_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_metadata(optim_sharding_type: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "distrib_optim_sharding_type": optim_sharding_type,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model: Model,
    optimizer=None,
    scheduler=None,
    train_state: dict | None = None,
    *,
    keep_last: int | None = None,
    optim_sharding_type: str = DEFAULT_OPTIM_SHARDING,
) -> Path:
    """Write `save_dir/iter_{step:07d}` atomically and point `save_dir/latest` at it (collective: every
    rank calls it). `keep_last` keeps only the newest K checkpoints. Returns the checkpoint directory."""
    if optim_sharding_type not in OPTIM_SHARDING_TYPES:
        raise ValueError(f"optim_sharding_type={optim_sharding_type!r}: expected one of {OPTIM_SHARDING_TYPES}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    train_state = dict(train_state or {})
    if train_state.get("step", step) != step:
        raise ValueError(f"train_state['step']={train_state['step']} != step={step}")
    train_state["step"] = step
    # serialise on every rank before any collective so a bad value fails everywhere, not just on rank 0
    meta = model_meta(model)
    meta["optimizer"] = optimizer_kind(optimizer)
    meta["optim_sharding_type"] = optim_sharding_type if is_distributed_optimizer(optimizer) else None
    json_files = {TRAIN_STATE_FILE: train_state, META_FILE: json.loads(json.dumps(meta, default=str))}
    if scheduler is not None:
        json_files[SCHEDULER_FILE] = scheduler.state_dict()
    json.dumps(json_files)

    save_dir = Path(save_dir)
    final, tmp = save_dir / iter_dir_name(step), save_dir / f"{TMP_PREFIX}{iter_dir_name(step)}"
    rank = _rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale(save_dir)
        (tmp / DIST_DIR).mkdir(parents=True)
        (tmp / RNG_DIR).mkdir()
    _barrier()

    sd_metadata = _sharded_metadata(optim_sharding_type)
    model_sd = model.module.sharded_state_dict(metadata=sd_metadata)
    state = {"model": model_sd}
    if optimizer is not None:
        prime_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=sd_metadata)
    dist_checkpointing.save(state, str(tmp / DIST_DIR), content_metadata=sd_metadata)
    buf = _to_bytes(_rng_state())
    _write_file(tmp / RNG_DIR / f"rank_{rank:05d}.pt", buf)
    if rank == 0:
        for name, obj in json_files.items():
            _write_json(tmp / name, obj)
    _barrier()

    if rank == 0:
        delay = float(os.environ.get(SLEEP_BEFORE_RENAME_ENV, "0") or 0)
        if delay > 0:
            print(f"rlad-ckpt: {tmp} written, sleeping {delay}s before the rename", flush=True)
            time.sleep(delay)
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming from it): replace it
            _remove_dir(final)
        os.rename(tmp, final)
        _fsync_dir(save_dir)
        _write_latest(save_dir, step)
        if keep_last is not None:
            for old in list_checkpoints(save_dir)[:-keep_last]:
                if old != step:
                    _remove_dir(checkpoint_dir(save_dir, old))
    _barrier()
    return final


def _to_bytes(obj) -> bytes:
    f = io.BytesIO()
    torch.save(obj, f)
    return f.getvalue()


def load_checkpoint(
    load_dir: str | Path,
    model: Model,
    optimizer=None,
    scheduler=None,
    *,
    step: int | None = None,
    load_rng: bool = True,
) -> dict:
    """Load a checkpoint into `model` (and `optimizer`, `scheduler` when given; collective).

    `step=None` reads `load_dir/latest`; returns {} when there is no checkpoint at all. Returns the saved
    train state (with `step`). Raises CheckpointError when the checkpoint is missing or for another model.
    RNG states are restored per global rank when the world size matches the saving run (warning otherwise).
    """
    load_dir = Path(load_dir)
    if step is None:
        step = resolve_step(load_dir)
        if step is None:
            return {}
    ckpt = checkpoint_dir(load_dir, step)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint (have steps {list_checkpoints(load_dir)})")
    check_complete(ckpt)
    saved_meta = check_meta(ckpt / META_FILE, model)
    content = dist_checkpointing.load_content_metadata(str(ckpt / DIST_DIR)) or {}
    sd_metadata = _sharded_metadata(content.get("distrib_optim_sharding_type", DEFAULT_OPTIM_SHARDING))

    model_sd = model.module.sharded_state_dict(metadata=sd_metadata)
    state = {"model": model_sd}
    if optimizer is not None:
        _check_optimizer_compat(ckpt, saved_meta, model, optimizer, sd_metadata)
        prime_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=sd_metadata)
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, str(ckpt / DIST_DIR))
        model.module.load_state_dict(loaded["model"])
        if optimizer is not None:
            load_optimizer_state(optimizer, loaded["optimizer"])
            platform.fix_shared_optimizer_step(optimizer)
            prime_torch_adam_state(optimizer)  # a step-0 save has no `step` entries

    if scheduler is not None:
        path = ckpt / SCHEDULER_FILE
        if not path.exists():
            raise CheckpointError(f"{path}: missing (the checkpoint was saved without a scheduler)")
        scheduler.load_state_dict(json.loads(path.read_text()))
    if load_rng:
        _load_rng(ckpt, saved_meta)
    _barrier()
    return json.loads((ckpt / TRAIN_STATE_FILE).read_text())


def _check_optimizer_compat(ckpt: Path, saved_meta: dict, model: Model, optimizer, sd_metadata: dict) -> None:
    """Clear errors for optimizer states that cannot load here (megatron would fail with a KeyError)."""
    saved_kind, kind = saved_meta.get("optimizer"), optimizer_kind(optimizer)
    if saved_kind != kind:
        raise CheckpointError(
            f"{ckpt / META_FILE}: the checkpoint's optimizer state is {saved_kind or 'absent'}, this run's optimizer "
            f"is {kind} (their state layouts differ: keep --bf16/--use-distributed-optimizer as saved, or load the "
            "model only)"
        )
    saved = saved_meta["saved_layout"]
    sharding = sd_metadata["distrib_optim_sharding_type"]
    if is_distributed_optimizer(optimizer) and sharding == "dp_reshardable" and (saved["tp"], saved["pp"]) != (
        model.tp, model.pp
    ):
        raise CheckpointError(
            f"{ckpt}: its DistributedOptimizer state is 'dp_reshardable' (saved at TP={saved['tp']} "
            f"PP={saved['pp']}) and cannot be loaded at TP={model.tp} PP={model.pp}; load without the optimizer "
            "or save with optim_sharding_type='fully_reshardable'"
        )


def _load_rng(ckpt: Path, saved_meta: dict) -> None:
    saved_world = saved_meta["saved_layout"]["world_size"]
    if saved_world != _world():
        warnings.warn(
            f"{ckpt}: saved with world size {saved_world}, loading at {_world()}: RNG states not restored",
            stacklevel=3,
        )
        return
    path = ckpt / RNG_DIR / f"rank_{_rank():05d}.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: missing RNG state for rank {_rank()}")
    _set_rng_state(torch.load(path, weights_only=True))

