"""Procedural task sets from reasoning-gym, generated offline from a seed (see `data.generators`).

Each sample keeps what the reward needs in `meta` (all picklable, numpy scalars made plain):
`rg_dataset` (name), `rg_config` (the generator config overrides) and `rg_entry` (the
reasoning-gym item, passed to its `score_answer`).
"""

from __future__ import annotations

from typing import Any

from rlad_megatron.data.addition import make_addition_dataset
from rlad_megatron.data.generators import BUILTIN_TASKS, EVAL_SEED_OFFSET, Split, generate_entries, split_seed, to_plain
from rlad_megatron.data.partition import draw_split
from rlad_megatron.data.prompts import PromptSample

__all__ = ["BUILTIN_TASKS", "EVAL_SEED_OFFSET", "default_system_prompt", "generate_entries", "make_task_dataset",
           "split_seed"]

ANSWER_INSTRUCTION = "default"  # key of reasoning_gym.utils.SYSTEM_PROMPTS: asks for <answer>...</answer>


def default_system_prompt() -> str:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS[ANSWER_INSTRUCTION]


def make_task_dataset(
    name: str,
    *,
    split: Split = "train",
    size: int,
    seed: int,
    system_prompt: str | None = "default",
    chat: bool = True,
    **cfg: Any,
) -> list[PromptSample]:
    """Seeded prompt set of `split` for a reasoning-gym task (or `addition`, see `data.addition`): the first `size`
    generator items whose question falls in `split` (`data.partition`: held-out sets never share an item with
    training sets).

    The prompt asks for the final answer inside `<answer>...</answer>`: by default reasoning-gym's
    "default" system prompt. `chat=True` gives `[system, user]` messages (system dropped when
    `system_prompt=None`); `chat=False` gives one string `system_prompt + "\\n\\n" + question`.
    `cfg` overrides the generator's config (e.g. `n_people=3`). `addition` ignores the prompt options.
    """
    if name == "addition":
        return make_addition_dataset(split, size, seed, **cfg)
    if system_prompt == "default":
        system_prompt = default_system_prompt()
    plain_cfg = to_plain(cfg)
    samples = []
    for entry, _ in draw_split(name, split=split, size=size, seed=seed, key=lambda e: e["question"], **cfg):
        question = entry["question"]
        if chat:
            prompt: Any = [{"role": "user", "content": question}]
            if system_prompt:
                prompt.insert(0, {"role": "system", "content": system_prompt})
        else:
            prompt = f"{system_prompt}\n\n{question}" if system_prompt else question
        answer = "" if entry["answer"] is None else str(entry["answer"])  # None: verifier-only tasks
        meta = {"rg_dataset": name, "rg_config": dict(plain_cfg), "rg_entry": entry}
        samples.append(PromptSample(prompt=prompt, answer=answer, task=name, meta=meta))
    return samples
