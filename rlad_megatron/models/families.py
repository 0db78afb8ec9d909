"""HF `config.json` -> Megatron-core `TransformerConfig` fields, one entry per architecture family.

A family says how its HF config maps onto GPT blocks: QKV bias (Qwen2), q/k RMSNorm (Qwen3),
RoPE scaling (Llama 3). Everything else (GQA, RoPE theta, eps, tied embeddings, head_dim) is shared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlad_megatron.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """What the builder and the converters need to know about one HF model."""

    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qkv_bias: bool
    qk_layernorm: bool
    tie_word_embeddings: bool
    init_std: float
    hf_config: dict = field(repr=False, compare=False, default_factory=dict)

    def transformer_config_kwargs(self) -> dict:
        """Model-shape fields of `TransformerConfig` (parallelism/precision are added by the builder)."""
        import torch.nn.functional as F

        return dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            layernorm_epsilon=self.norm_eps,
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_layernorm,
            init_method_std=self.init_std,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
        )


# family name -> (HF architectures it accepts, qkv bias default, q/k norm)
_FAMILIES: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "qwen2": (("Qwen2ForCausalLM",), True, False),
    "qwen3": (("Qwen3ForCausalLM",), False, True),
    "llama": (("LlamaForCausalLM",), False, False),
}


def supported_architectures() -> list[str]:
    return sorted(a for archs, _, _ in _FAMILIES.values() for a in archs)


def family_of(architecture: str) -> str:
    for name, (archs, _, _) in _FAMILIES.items():
        if architecture in archs:
            return name
    raise UserError(
        f"config.json: architectures={architecture!r} is not supported; expected one of {supported_architectures()}"
    )


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """RoPE theta and scaling from either transformers<5 (`rope_theta`, `rope_scaling`) or >=5
    (`rope_parameters`) configs."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") not in ("default", None):
        scaling = dict(params)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return theta, None
        if kind != "llama3":
            raise UserError(f"config.json: rope_scaling type {kind!r} is not supported (only 'llama3')")
        scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
    return theta, scaling


def spec_from_hf_config(cfg: dict | str | Path) -> ModelSpec:
    """Parse an HF config (dict, `config.json` path or model dir). Raises UserError naming the file and field."""
    if isinstance(cfg, dict):
        return _spec_from_dict(cfg)
    path = Path(cfg)
    path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path}: no such file (expected a Hugging Face model dir with config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    try:
        return _spec_from_dict(cfg)
    except UserError as e:
        raise UserError(str(e).replace("config.json: ", f"{path}: ", 1)) from None


def _spec_from_dict(cfg: dict) -> ModelSpec:
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise UserError(f"config.json: 'architectures' must list exactly one class, got {archs!r}")
    family = family_of(archs[0])
    _, qkv_bias_default, qk_norm = _FAMILIES[family]

    def need(key: str):
        if key not in cfg:
            raise UserError(f"config.json: field {key!r} is missing (needed for {archs[0]})")
        return cfg[key]

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UserError(f"config.json: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope(cfg)
    qkv_bias = bool(cfg.get("attention_bias", qkv_bias_default)) if family != "qwen2" else True
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json: hidden_act={cfg['hidden_act']!r} is not supported (expected 'silu')")
    return ModelSpec(
        family=family,
        architecture=archs[0],
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        kv_channels=head_dim,
        vocab_size=int(need("vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        qk_layernorm=qk_norm,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=float(cfg.get("initializer_range", 0.02)),
        hf_config=cfg,
    )


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the smallest multiple of `divisible_by * tp` >= vocab_size. The padded
    rows are zero in converted checkpoints, masked out of every softmax and stripped on export."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
