"""Optimizer state in training checkpoints: the optimizer kind recorded in the meta, priming torch Adam state so
Megatron can build a state dict, and loading a DistributedOptimizer's state around megatron-core 0.16 quirks."""

from __future__ import annotations

import torch


def inner_torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            out.append(inner)
    return out


def prime_torch_adam_state(optimizer) -> None:
    """Give every param of a torch (Adam|AdamW) optimizer the state torch's first step would create
    (step 0, zero moments). Megatron's DistributedOptimizer cannot build its state dict without it
    (no apex/TE: it reads `state[p]["step"]`); the result is numerically a fresh optimizer."""
    for opt in inner_torch_optimizers(optimizer):
        for group in opt.param_groups:
            on_device = group.get("capturable") or group.get("fused")
            for p in group["params"]:
                state = opt.state[p]
                if "step" not in state:
                    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
                for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
                    if key not in state:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_kind(optimizer) -> str | None:
    """Megatron optimizer class (they save different state layouts), e.g. 'DistributedOptimizer'."""
    if optimizer is None:
        return None
    return "+".join(type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed_optimizer(optimizer) -> bool:
    if optimizer is None:
        return False
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


_PARAM_STATE_LOADERS = {
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
}


def load_optimizer_state(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)`, except for a DistributedOptimizer over torch Adam: megatron-core
    0.16 then fails on the per-param `step` (KeyError in `_set_main_param_and_optimizer_states` for the
    fully_reshardable / model-space formats), so its param state is loaded with `step` set aside; `step`
    itself comes from the param groups, as Megatron intends."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(opts) == 1 else [state[k] for k in sorted(state)]
    for opt, sd in zip(opts, states, strict=True):
        if not (isinstance(opt, DistributedOptimizer) and inner_torch_optimizers(opt) and "param_state" in sd):
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        param_state, kind = sd.pop("param_state"), sd.pop("param_state_sharding_type")
        opt.load_state_dict(sd)  # param groups + step (shared by all params: fixed by the caller)
        steps = {p: st.pop("step") for p, st in opt.optimizer.state.items() if "step" in st}
        try:
            getattr(opt, _PARAM_STATE_LOADERS[kind])(param_state)
        finally:
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step
    if len(opts) > 1:
        optimizer._synchronize_steps()
