"""Megatron DDP wrapper, optimizer and LR scheduler for the student.

`build_optimizer` wraps the student's `GPTModel` in Megatron's `DistributedDataParallel` (grads reduced
in fp32, no overlap), builds Megatron's Adam (`get_megatron_optimizer`: fp32, bf16 with fp32 main params,
or the DistributedOptimizer) and an `OptimizerParamScheduler`. Megatron picks apex/TE fused Adam when
installed and `torch.optim.AdamW` otherwise. Everything uses Megatron's global (student) parallel state.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from rlad_megatron.models.builder import Model

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def _cast_to_bf16(model: Model) -> None:
    """Megatron mixed precision needs every param in bf16 (Megatron-LM's Float16Module casts the module);
    the local spec builds its torch norms in fp32 whatever `params_dtype` is. Cast those."""
    if model.config.params_dtype != torch.bfloat16:
        raise ValueError(f"bf16=True needs a model built with params_dtype=torch.bfloat16, not {model.config.params_dtype}")
    for p in model.module.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)


def build_optimizer(
    model: Model,
    *,
    lr: float,
    min_lr: float = 0.0,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    clip_grad: float = 1.0,
    bf16: bool = False,
    use_distributed_optimizer: bool = False,
    lr_warmup_steps: int = 0,
    lr_decay_steps: int | None = None,
    lr_decay_style: str = "constant",
    lr_warmup_init: float = 0.0,
    ddp_overrides: dict | None = None,
    **optimizer_config_overrides,
) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """(ddp_module, optimizer, scheduler) for `model` (the student).

    One scheduler step = one optimizer step (`scheduler.step(1)` after each `optimizer.step()`).
    `lr_decay_steps` defaults to `lr_warmup_steps + 1` for the constant style and is required otherwise.
    `optimizer_config_overrides` go straight to Megatron's `OptimizerConfig` (e.g. `loss_scale`,
    `log_num_zeros_in_grad`, `decoupled_weight_decay`).
    """
    if lr_decay_style not in LR_DECAY_STYLES:
        raise ValueError(f"lr_decay_style={lr_decay_style!r}: expected one of {LR_DECAY_STYLES}")
    if lr_decay_steps is None:
        if lr_decay_style != "constant":
            raise ValueError(f"lr_decay_style={lr_decay_style!r} needs lr_decay_steps")
        lr_decay_steps = lr_warmup_steps + 1
    if lr_decay_steps <= lr_warmup_steps:
        raise ValueError(f"lr_decay_steps={lr_decay_steps} must be > lr_warmup_steps={lr_warmup_steps}")
    if not 0.0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= min_lr ({min_lr}) <= lr ({lr})")

    if bf16:
        _cast_to_bf16(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        **(ddp_overrides or {}),
    )
    ddp_module = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model.module)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
        **optimizer_config_overrides,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_module])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=lr_warmup_init,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=lr_warmup_steps,
        lr_decay_steps=lr_decay_steps,
        lr_decay_style=lr_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=lr_decay_steps,
        wd_incr_style="constant",
    )
    # As Megatron-LM's training loop does: the schedule finalises gradients after the last micro-batch
    # (DP all-reduce / reduce-scatter, tied-embedding all-reduce between the first and last PP stage) and
    # applies the optimizer's loss scale in the backward.
    from megatron.core.distributed import finalize_model_grads

    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    return ddp_module, optimizer, scheduler
