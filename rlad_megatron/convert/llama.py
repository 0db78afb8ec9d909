"""Llama 2/3: the plain decoder (RoPE scaling lives in the builder); q/k/v bias only with `attention_bias`."""

from rlad_megatron.convert.common import ATTENTION, EMBEDDING, FINAL, IGNORED_HF, MLP, QKV_BIAS, FamilyMapping

MAPPING = FamilyMapping(
    family="llama",
    embedding=EMBEDDING,
    layer=(*ATTENTION, *QKV_BIAS, *MLP),
    final=FINAL,
    ignored_hf=IGNORED_HF,
)
