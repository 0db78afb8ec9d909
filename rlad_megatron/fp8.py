"""FP8: Megatron/Transformer Engine training flags, and block-FP8 rollout weights for SGLang.

Training (`--fp8-format`, `--fp8-recipe`, `--fp8-param-gather`, Megatron's names) maps onto megatron-core's
`TransformerConfig(fp8=, fp8_recipe=, fp8_param=)`; only TE layers run in FP8, so it needs TE on a GPU with FP8
tensor cores. `validate_fp8` refuses a setup that cannot run, at start-up, with the reason:

| what | needs |
|---|---|
| any `--fp8-format` | CUDA, `transformer_engine.pytorch` importable, compute capability >= 8.9 (Ada/Hopper) |
| `--fp8-recipe blockwise` | compute capability >= 9.0 (Hopper) and CUDA >= 12.9 |
| `--fp8-param-gather` | `--fp8-format` and the distributed optimizer |
| `--rollout-fp8` | CUDA, compute capability >= 8.9 (SGLang's FP8 GEMMs) |

Rollout FP8 (`--rollout-fp8`, the usual BF16-train / FP8-rollout recipe): each 2-D linear weight `W [M, N]` is sent
as `W_fp8 = W / s` (float8_e4m3fn) plus `name + "_scale_inv" = s [ceil(M/128), ceil(N/128)]` fp32, one scale per
128x128 block with `s = amax(|block|) / 448`, so `W ~= W_fp8 * s` block-wise: the HF/DeepSeek-V3 FP8 layout
(`quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}`) SGLang loads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FORMATS = ("e4m3", "hybrid")
RECIPES = ("delayed", "tensorwise", "blockwise")
_NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm")  # kept in high precision, as SGLang's FP8 loader expects


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


# ------------------------------------------------------------------------------------------- block FP8


def quantize_block_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """W [M, N] -> (W_fp8 [M, N] float8_e4m3fn, scale_inv [ceil(M/bm), ceil(N/bn)] fp32), W ~= W_fp8 * scale_inv.

    Each block's scale maps its amax onto the e4m3 maximum (448); edge blocks cover the remainder only.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_block_fp8: expected a 2-D weight, got shape {tuple(w.shape)}")
    bm, bn = block
    m, n = w.shape
    x = w.detach().float()
    pm, pn = -m % bm, -n % bn
    if pm or pn:
        x = F.pad(x, (0, pn, 0, pm))
    xb = x.view((m + pm) // bm, bm, (n + pn) // bn, bn)
    amax = xb.abs().amax(dim=(1, 3))
    # tensor / tensor: IEEE division on every device (CUDA turns "/ python scalar" into a reciprocal multiply)
    scale = (amax / torch.full_like(amax, FP8_E4M3_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
    q = (xb / scale[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(m + pm, n + pn)[:m, :n].contiguous(), scale.contiguous()


def dequantize_block_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_block_fp8`: W_fp8 * scale_inv broadcast over each block."""
    m, n = w_fp8.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]
    return (w_fp8.float() * s).to(dtype)


def fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """Linear weights (2-D `*.weight`) outside embeddings, the LM head and norms."""
    return t.dim() == 2 and name.endswith(".weight") and not any(k in name for k in _NOT_QUANTIZED)


def scale_name(name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight` -> `model.layers.0.mlp.down_proj.weight_scale_inv`."""
    return name + "_scale_inv"


def quantize_named_tensors(named: list[tuple[str, torch.Tensor]], block: tuple[int, int] = (128, 128)
                           ) -> list[tuple[str, torch.Tensor]]:
    """HF-named tensors -> the same list with each eligible weight replaced by (name, fp8), (name_scale_inv, s)."""
    out = []
    for name, t in named:
        if fp8_eligible(name, t):
            q, s = quantize_block_fp8(t, block)
            out += [(name, q), (scale_name(name), s)]
        else:
            out.append((name, t))
    return out


def fp8_quantization_config(block: tuple[int, int] = (128, 128)) -> dict:
    """The HF `quantization_config` of a block-FP8 checkpoint (dynamic per-token-group activation scales)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [int(block[0]), int(block[1])]}


def prepare_fp8_model_dir(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """A model dir for an FP8 SGLang engine started with `load_format="dummy"`: `src`'s config (plus the FP8
    `quantization_config`), tokenizer and generation files, no weights (the first sync sends them)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt") and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = fp8_quantization_config(block)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def quantize_hf_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Write a block-FP8 copy of an HF safetensors checkpoint (weights + `*_scale_inv`) that SGLang loads."""
    from safetensors.torch import load_file, save_file

    dst = prepare_fp8_model_dir(src, dst, block)
    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights")
    weight_map = {}
    for f in files:
        named = quantize_named_tensors(list(load_file(f).items()), block)
        save_file({n: t.contiguous() for n, t in named}, dst / f.name, metadata={"format": "pt"})
        weight_map.update({n: f.name for n, _ in named})
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dst
