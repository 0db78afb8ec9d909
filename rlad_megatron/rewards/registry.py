"""Reward registry: a name -> `reward(response, sample) -> float`.

Built-ins: `knights_knaves`, `countdown`, `chain_sum`, `basic_arithmetic` (reasoning-gym scorer of
that task; a sample of another task is an error), `reasoning_gym` (routes each sample to its own
reasoning-gym scorer via `meta`), `math` (math-verify, boxed-only), `addition` (exact answer after
the final `A`). Any other name of the form `package.module:function` is imported; such a function
may carry a `format_fn(response, sample) -> bool` attribute to support the format bonus.

Correctness is binary by default. With `format_reward=f > 0` the reward is
`correctness + f * format_ok` (answer tag / box / trace present), so a well-formed wrong answer
earns f and a correct one 1 + f. Names are resolvable in any process, which is what lets
`rewards.pool` score in worker processes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache, partial

from rlad_megatron.data.prompts import PromptSample
from rlad_megatron.errors import UserError
from rlad_megatron.rewards.addition import addition_reward, trace_format
from rlad_megatron.rewards.math import boxed_format, math_reward
from rlad_megatron.rewards.reasoning_gym import answer_tag_format, rg_reward

RewardFn = Callable[[str, PromptSample], float]
FormatFn = Callable[[str, PromptSample], bool]

RG_TASK_REWARDS = ("knights_knaves", "countdown", "chain_sum", "basic_arithmetic")
BUILTIN_REWARDS = (*RG_TASK_REWARDS, "reasoning_gym", "math", "addition")


def _import_reward(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"custom reward {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"custom reward {spec!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"custom reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"custom reward {spec!r}: {attr!r} is not callable")
    return fn


def _resolve(name: str, partial_credit: bool) -> tuple[RewardFn, FormatFn | None]:
    if name in RG_TASK_REWARDS:
        return partial(rg_reward, task=name, partial_credit=partial_credit), answer_tag_format
    if name == "reasoning_gym":
        return partial(rg_reward, task=None, partial_credit=partial_credit), answer_tag_format
    if partial_credit:
        raise UserError(f"reward {name!r} has no partial credit (only reasoning-gym rewards do)")
    if name == "math":
        return math_reward, boxed_format
    if name == "addition":
        return addition_reward, trace_format
    if ":" in name:
        fn = _import_reward(name)
        return fn, getattr(fn, "format_fn", None)
    raise UserError(f"unknown reward {name!r}; use one of {', '.join(BUILTIN_REWARDS)} or 'package.module:function'")


def _with_format(base: RewardFn, format_fn: FormatFn, weight: float, response: str, sample: PromptSample) -> float:
    return float(base(response, sample)) + weight * float(bool(format_fn(response, sample)))


def _as_float(base: RewardFn, response: str, sample: PromptSample) -> float:
    return float(base(response, sample))


@lru_cache(maxsize=64)
def get_reward_fn(name: str, *, format_reward: float = 0.0, partial_credit: bool = False) -> RewardFn:
    """The reward function registered under `name` (see module doc); a bad name or option is a `UserError`."""
    if format_reward < 0:
        raise UserError(f"format_reward must be >= 0, got {format_reward}")
    base, format_fn = _resolve(name, partial_credit)
    if format_reward == 0:
        return partial(_as_float, base)
    if format_fn is None:
        raise UserError(f"reward {name!r} has no format check (--format-reward needs one); give the function a "
                        "'format_fn' attribute")
    return partial(_with_format, base, format_fn, format_reward)


def warm_up(name: str) -> None:
    """Do what the built-in reward `name` does lazily on its first call (imports; math-verify also builds its
    LaTeX grammar on the first parse), so that a per-sample deadline does not count it: seconds, not milliseconds."""
    if name == "math":
        math_reward("\\boxed{1/2}", PromptSample("warm-up", "0.5"))
    elif name in RG_TASK_REWARDS or name == "reasoning_gym":
        import reasoning_gym  # noqa: F401
