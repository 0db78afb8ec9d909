"""Qwen3 (dense): per-head RMSNorm on queries and keys, no q/k/v bias unless `attention_bias` is set."""

from rlad_megatron.convert.common import (
    ATTENTION,
    EMBEDDING,
    FINAL,
    IGNORED_HF,
    MLP,
    QK_NORM,
    QKV_BIAS,
    FamilyMapping,
)

MAPPING = FamilyMapping(
    family="qwen3",
    embedding=EMBEDDING,
    layer=(*ATTENTION, *QKV_BIAS, *QK_NORM, *MLP),
    final=FINAL,
    ignored_hf=IGNORED_HF,
)
