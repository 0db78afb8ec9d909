"""Qwen2 / Qwen2.5: Llama-style decoder with a bias on the q/k/v projections."""

from rlad_megatron.convert.common import ATTENTION, EMBEDDING, FINAL, IGNORED_HF, MLP, QKV_BIAS, FamilyMapping

MAPPING = FamilyMapping(
    family="qwen2",
    embedding=EMBEDDING,
    layer=(*ATTENTION, *QKV_BIAS, *MLP),
    final=FINAL,
    ignored_hf=IGNORED_HF,
)
