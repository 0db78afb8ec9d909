"""What a model path holds, checked from files before anything is built, and building a model from it.

Three formats (`model_format`):
  * `hf`             - a Hugging Face model dir (config.json + safetensors);
  * `megatron`       - a model-only Megatron checkpoint (tools/convert_hf_to_megatron.py: `rlad_meta.json` with
                       `version`, torch_dist shards beside it);
  * `megatron-train` - an `rlad-train --save` dir (`latest` and/or `iter_*`) or one of its `iter_*` dirs.

`inspect_megatron(path)` validates a Megatron checkpoint of either kind (meta, every shard complete) and says
which step of a save dir is used; `build_megatron(source)` then builds the model for the current process groups
(`platform.init` first) with the checkpoint's padded vocab and dtype, and loads the weights (collective).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlad_megatron.errors import UserError, as_user_error


def model_format(path: str | Path, *, flag: str = "--model") -> str:
    """'hf', 'megatron' or 'megatron-train' (see the module doc); UserError naming `flag` otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such directory")
    if (path / "config.json").exists():
        return "hf"
    from rlad_megatron.checkpoint_dirs import LATEST_FILE, META_FILE, list_checkpoints

    meta = path / META_FILE
    if meta.exists():
        try:
            fields = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{flag} {meta}: not valid JSON ({e}); the file is truncated or corrupt") from None
        if "version" in fields:
            return "megatron"
        if path.name.startswith("iter_"):
            return "megatron-train"
    if (path / LATEST_FILE).exists() or list_checkpoints(path):
        return "megatron-train"
    raise UserError(f"{flag} {path}: neither a Hugging Face dir (config.json), a Megatron checkpoint "
                    "(rlad_meta.json) nor an rlad-train --save dir (latest / iter_*)")


@dataclass(frozen=True)
class MegatronSource:
    """A validated Megatron checkpoint: where to load from and what model it holds."""

    fmt: str  # "megatron" or "megatron-train"
    path: Path  # the model-only dir, or the save dir of a training checkpoint
    step: int | None  # training checkpoints: the iteration loaded
    hf_config: dict
    padded_vocab: int
    dtype: torch.dtype
    note: str  # one line: what is loaded (and why that iteration)

    @property
    def label(self) -> str:
        return self.path.name if self.step is None else f"step{self.step}"


def inspect_megatron(path: str | Path, *, flag: str = "--load") -> MegatronSource:
    """Validate a Megatron checkpoint (model-only, save dir or `iter_*` dir) from its files; UserError naming the
    broken file. A save dir resolves like `--load` (`checkpoint_dirs.resolve_resume`)."""
    with as_user_error(flag=flag):
        return _inspect(Path(path), flag)


def _inspect(path: Path, flag: str) -> MegatronSource:
    fmt = model_format(path, flag=flag)
    if fmt == "hf":
        raise UserError(f"{flag} {path}: a Hugging Face dir, expected a Megatron checkpoint")
    if fmt == "megatron":
        from rlad_megatron.convert.dist_checkpoint import check_model_checkpoint

        meta = check_model_checkpoint(path)
        return MegatronSource(fmt, path, None, meta.hf_config, meta.padded_vocab, meta.torch_dtype,
                              f"model-only checkpoint {path}")
    from rlad_megatron.checkpoint_dirs import META_FILE, check_complete, checkpoint_dir, resolve_resume

    if path.name.startswith("iter_") and (path / META_FILE).exists():
        save_dir, step = path.parent, int(path.name.split("_", 1)[1])
        check_complete(path)
        note = f"training checkpoint {path} (step {step})"
    else:
        save_dir = path
        step, why = resolve_resume(path)
        if step is None:
            raise UserError(f"{flag} {path}: no checkpoint in this save dir (no latest file, no iter_* directory)")
        note = f"training checkpoint {checkpoint_dir(path, step)} (step {step})"
        if "newest complete" in why:  # no usable `latest`: say which iteration was picked and why
            note = why.replace("resuming from", "using")
    meta = json.loads((checkpoint_dir(save_dir, step) / META_FILE).read_text())
    dtype = getattr(torch, str(meta["params_dtype"]).removeprefix("torch."))
    return MegatronSource(fmt, save_dir, step, meta["hf_config"], int(meta["padded_vocab"]), dtype, note)


def build_megatron(source: MegatronSource, dtype: torch.dtype | None = None):
    """The checkpoint's model on the current student process groups, weights loaded (collective)."""
    from rlad_megatron.models.builder import build_model
    from rlad_megatron.models.families import spec_from_hf_config

    if source.fmt == "megatron":
        from rlad_megatron.convert import build_model_from_megatron_checkpoint

        return build_model_from_megatron_checkpoint(source.path, params_dtype=dtype)
    from rlad_megatron import platform
    from rlad_megatron.checkpoint import load_checkpoint

    tp = platform.student_process_groups().tp.size()
    if source.padded_vocab % tp:
        raise UserError(f"{source.path}: padded vocab {source.padded_vocab} is not divisible by TP={tp}; use a TP "
                        "that divides it")
    model = build_model(spec_from_hf_config(source.hf_config), params_dtype=dtype or source.dtype,
                        padded_vocab=source.padded_vocab)
    load_checkpoint(source.path, model, step=source.step, load_rng=False)
    return model
