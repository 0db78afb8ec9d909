"""Build Megatron-core `GPTModel`s (student or teacher) from a `ModelSpec`.

Transformer Engine's layer spec is used when TE imports on a CUDA machine (FP8 needs it); the local
spec (torch norms, unfused attention) otherwise. Each model carries its own `ProcessGroupCollection`,
so a teacher can run at another TP/PP than the student in the same processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from rlad_megatron import platform
from rlad_megatron.models.families import ModelSpec, padded_vocab_size


@dataclass
class Model:
    """One GPT model on this rank plus what it needs to run: spec, config, groups, padded vocab."""

    module: GPTModel
    spec: ModelSpec
    config: TransformerConfig
    pg: ProcessGroupCollection
    padded_vocab: int

    @property
    def tp(self) -> int:
        return self.pg.tp.size()

    @property
    def pp(self) -> int:
        return self.pg.pp.size()

    @property
    def pp_rank(self) -> int:
        return self.pg.pp.rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def te_available() -> bool:
    """Transformer Engine usable here: CUDA present and `transformer_engine.pytorch` imports."""
    if not platform.has_cuda():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # the empty TE meta package raises RuntimeError
        return False
    return True


def layer_spec(spec: ModelSpec, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3 RoPE frequency scaling with the config's own factors (Megatron hard-codes 1/4/8192)."""
    import math

    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def build_model(
    spec: ModelSpec,
    *,
    pg: ProcessGroupCollection | None = None,
    params_dtype: torch.dtype = torch.float32,
    padded_vocab: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    use_te: bool | None = None,
    seq_length: int | None = None,
    **config_overrides,
) -> Model:
    """A GPTModel for this rank's pipeline stage.

    `pg` defaults to Megatron's global (student) groups. `config_overrides` are passed straight to
    `TransformerConfig` (Megatron's own field names: `recompute_granularity`, `fp8`, `fp8_recipe`, ...).
    Weights are drawn on the CPU from the full master tensor and split (`use_cpu_initialization`),
    so the same seed gives the same model at any TP.
    """
    pg = pg or platform.student_process_groups()
    tp, pp = pg.tp.size(), pg.pp.size()
    if use_te is None:
        use_te = te_available()
    elif use_te and not te_available():
        raise RuntimeError(
            "the Transformer Engine layer spec was requested but transformer_engine.pytorch is not usable here "
            "(it needs a CUDA GPU and the transformer-engine[pytorch] package: pip install -e .[gpu])"
        )
    for name, n in (("num_attention_heads", spec.num_attention_heads), ("num_key_value_heads", spec.num_query_groups)):
        if n % tp:
            raise ValueError(f"{name}={n} is not divisible by tensor-model-parallel size {tp}")
    if spec.num_layers % pp:
        raise ValueError(f"num_hidden_layers={spec.num_layers} is not divisible by pipeline-model-parallel size {pp}")
    padded_vocab = padded_vocab or padded_vocab_size(spec.vocab_size, tp, make_vocab_size_divisible_by)
    if padded_vocab % tp or padded_vocab < spec.vocab_size:
        raise ValueError(f"padded vocab {padded_vocab} must be >= {spec.vocab_size} and divisible by TP={tp}")

    kwargs = spec.transformer_config_kwargs()
    kwargs.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        sequence_parallel=False,
        # gloo matches same-peer messages in posting order: batched p2p swaps them (docs/cpu.md)
        batch_p2p_comm=platform.has_cuda(),
        gradient_accumulation_fusion=False,
    )
    kwargs.update(config_overrides)
    config = TransformerConfig(**kwargs)
    pp_rank = pg.pp.rank()
    module = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, use_te),
        vocab_size=padded_vocab,
        max_sequence_length=seq_length or spec.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        pg_collection=pg,
    )
    for p in module.parameters():  # the torch-norm fallback of the local spec allocates fp32 weights
        if p.dtype != params_dtype:
            p.data = p.data.to(params_dtype)
    if spec.rope_scaling is not None:
        rope = module.rotary_pos_emb
        rope.inv_freq = _llama3_inv_freq(rope.inv_freq, spec.rope_scaling)
    if platform.has_cuda():
        module.cuda(torch.cuda.current_device())
    return Model(module=module, spec=spec, config=config, pg=pg, padded_vocab=padded_vocab)
