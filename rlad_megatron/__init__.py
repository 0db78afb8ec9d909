"""rlad_megatron: reinforcement-aware distillation (RLAD / TRRD) on Megatron-core."""

__version__ = "0.1.0"
