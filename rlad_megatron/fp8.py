"""FP8 training through Transformer Engine: Megatron's flags and the start-up checks.

`--fp8-format`, `--fp8-recipe`, `--fp8-param-gather` (Megatron's names) map onto megatron-core's
`TransformerConfig(fp8=, fp8_recipe=, fp8_param=)`; only TE layers run in FP8, so it needs TE on a GPU with FP8
tensor cores. `validate_fp8` refuses a setup that cannot run, at start-up, with the reason:

| what | needs |
|---|---|
| any `--fp8-format` | CUDA, `transformer_engine.pytorch` importable, compute capability >= 8.9 (Ada/Hopper) |
| `--fp8-recipe blockwise` | compute capability >= 9.0 (Hopper) and CUDA >= 12.9 |
| `--fp8-param-gather` | `--fp8-format` and the distributed optimizer |
| `--rollout-fp8` | CUDA, compute capability >= 8.9 (SGLang's FP8 GEMMs) |

The block-FP8 rollout weights of `--rollout-fp8` are `rlad_megatron.rollout.sglang.fp8_weights`.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass

import torch

FORMATS = ("e4m3", "hybrid")
RECIPES = ("delayed", "tensorwise", "blockwise")


def add_fp8_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("FP8 (Transformer Engine training; block-FP8 rollouts)")
    g.add_argument("--fp8-format", choices=FORMATS, default=None,
                   help="train TE layers in FP8: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients)")
    g.add_argument("--fp8-recipe", choices=RECIPES, default="delayed",
                   help="scaling recipe: delayed (amax history), tensorwise (current per-tensor), "
                        "blockwise (128x128 blocks; Hopper, CUDA >= 12.9)")
    g.add_argument("--fp8-param-gather", action="store_true",
                   help="keep params in FP8 and all-gather them in FP8 (needs --use-distributed-optimizer)")
    g.add_argument("--rollout-fp8", action="store_true",
                   help="push block-FP8 weights (+ weight_scale_inv) to SGLang; training stays in --bf16")
    g.add_argument("--rollout-fp8-block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"),
                   help="block size of the rollout FP8 scales")
    return parser


@dataclass(frozen=True)
class GpuFacts:
    """What FP8 support depends on; `GpuFacts.probe()` reads this machine."""

    cuda: bool
    capability: tuple[int, int] | None = None
    cuda_version: tuple[int, ...] | None = None
    te: bool = False
    name: str = ""

    @classmethod
    def probe(cls) -> GpuFacts:
        if not torch.cuda.is_available():
            return cls(cuda=False)
        from rlad_megatron.models.builder import te_available

        cv = tuple(int(x) for x in (torch.version.cuda or "0").split(".")[:2])
        return cls(cuda=True, capability=tuple(torch.cuda.get_device_capability()), cuda_version=cv,
                   te=te_available(), name=torch.cuda.get_device_name())


def _check_recipe_names() -> None:
    """Our choices must be values megatron-core's TransformerConfig accepts (caught by tests on a bump)."""
    from megatron.core.transformer import TransformerConfig

    hints = typing.get_type_hints(TransformerConfig)
    allowed = {a for arg in typing.get_args(hints["fp8_recipe"]) for a in (typing.get_args(arg) or (arg,))}
    formats = {a for arg in typing.get_args(hints["fp8"]) for a in (typing.get_args(arg) or (arg,))}
    if not set(RECIPES) <= allowed or not set(FORMATS) <= formats:
        raise RuntimeError(f"megatron-core's TransformerConfig accepts fp8={formats}, fp8_recipe={allowed}; "
                           f"this project offers {FORMATS} / {RECIPES}")


def validate_fp8(args: argparse.Namespace, facts: GpuFacts | None = None) -> dict:
    """TransformerConfig overrides for the FP8 flags ({} when FP8 training is off); raises with the reason when
    this machine cannot run what was asked (see the module table)."""
    fmt = getattr(args, "fp8_format", None)
    recipe = getattr(args, "fp8_recipe", "delayed") or "delayed"
    param_gather = bool(getattr(args, "fp8_param_gather", False))
    rollout = bool(getattr(args, "rollout_fp8", False))
    if fmt is None and not rollout:
        if param_gather:
            raise ValueError("--fp8-param-gather needs --fp8-format (FP8 params only exist in FP8 training)")
        return {}
    facts = facts or GpuFacts.probe()
    what = f"--fp8-format {fmt}" if fmt else "--rollout-fp8"
    if not facts.cuda:
        raise RuntimeError(f"{what} needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); this "
                           "machine has none. Drop the FP8 flags on CPU (training runs in fp32/bf16).")
    cap = facts.capability or (0, 0)
    if cap < (8, 9):
        raise RuntimeError(f"{what} needs compute capability >= 8.9 (Ada/Hopper FP8 tensor cores); "
                           f"{facts.name or 'this GPU'} is {cap[0]}.{cap[1]}")
    if fmt is None:
        return {}
    if not facts.te:
        raise RuntimeError(f"{what} needs Transformer Engine (FP8 runs only in TE layers): transformer_engine.pytorch "
                           "does not import here. Install it with pip install -e .[gpu] (transformer-engine[pytorch])")
    if recipe == "blockwise":
        if cap < (9, 0):
            raise RuntimeError(f"--fp8-recipe blockwise needs compute capability >= 9.0 (Hopper); "
                               f"{facts.name or 'this GPU'} is {cap[0]}.{cap[1]}")
        if (facts.cuda_version or (0,)) < (12, 9):
            raise RuntimeError(f"--fp8-recipe blockwise needs CUDA >= 12.9 (TE's block-scaled GEMMs); torch reports "
                               f"CUDA {'.'.join(map(str, facts.cuda_version or ()))}")
    if param_gather and not getattr(args, "use_distributed_optimizer", True):
        raise ValueError("--fp8-param-gather needs --use-distributed-optimizer (Megatron all-gathers FP8 params "
                         "only through the distributed optimizer)")
    _check_recipe_names()
    return {"fp8": fmt, "fp8_recipe": recipe, "fp8_param": param_gather}


def ddp_overrides(args: argparse.Namespace) -> dict:
    """`DistributedDataParallelConfig` fields the FP8 flags imply."""
    return {"fp8_param_gather": True} if getattr(args, "fp8_param_gather", False) else {}
