"""The measured held-out check of a reproduction: regenerate every prompt set any stage trains on (teacher SFT,
student SFT, the tuning seed, every final seed) and both held-out sets (`eval`, `tune`), and count shared prompts.

    python -m rlad_megatron.reproduce.heldout --out OUT --recipe OUT/recipe.json     # writes OUT/heldout.json

The sets are rebuilt with the same loader and flags as the runs (`data.loader.load_prompts`, `recipe.TASK_CONFIG`),
so the counts are of the prompts the models saw, not of a re-implementation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlad_megatron.data.loader import load_prompts, parse_task_config, prompt_key
from rlad_megatron.reproduce.recipe import Recipe, training_sets


def prompt_sets(r: Recipe) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(training sets, held-out sets) as sets of prompt texts."""
    from rlad_megatron.data.char_tokenizer import build_char_tokenizer

    tok, configs = build_char_tokenizer(), parse_task_config(list(r.task_config))

    def prompts(split: str, size: int, seed: int) -> set[str]:
        return {prompt_key(s) for s in load_prompts("builtin:addition", split=split, size=size, seed=seed,
                                                    tokenizer=tok, apply_chat_template=False, configs=configs)}

    train = {name: prompts("train", size, seed) for name, (size, seed) in training_sets(r).items()}
    held = {"eval": prompts("eval", r.eval_size, r.eval_seed), "tune": prompts("tune", r.eval_size, r.eval_seed)}
    return train, held


def measure(r: Recipe) -> dict:
    train, held = prompt_sets(r)
    union = set().union(*train.values())
    return {"sizes": {k: len(v) for k, v in {**train, **held}.items()}, "training_union": len(union),
            "eval_vs_training": len(held["eval"] & union), "tune_vs_training": len(held["tune"] & union),
            "eval_vs_tune": len(held["eval"] & held["tune"]),
            "eval_vs_each": {k: len(held["eval"] & v) for k, v in train.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlad_megatron.reproduce.heldout", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", required=True, help="recipe.json written by the driver")
    a = p.parse_args(argv)
    rec = json.loads(Path(a.recipe).read_text())
    r = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec.items()})
    result = measure(r)
    (Path(a.out) / "heldout.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
