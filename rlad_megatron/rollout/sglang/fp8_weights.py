"""Block-FP8 rollout weights for SGLang (`--rollout-fp8`, the usual BF16-train / FP8-rollout recipe).

Each 2-D linear weight `W [M, N]` is sent as `W_fp8 = W / s` (float8_e4m3fn) plus `name + "_scale_inv" = s
[ceil(M/128), ceil(N/128)]` fp32, one scale per 128x128 block with `s = amax(|block|) / 448`, so `W ~= W_fp8 * s`
block-wise: the HF/DeepSeek-V3 FP8 layout (`quantization_config = {"quant_method": "fp8", "weight_block_size":
[128, 128]}`) SGLang loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm")  # kept in high precision, as SGLang's FP8 loader expects

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
