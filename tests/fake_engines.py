"""Rollout engines for loop tests, built through `--rollout-engine tests.fake_engines:<factory>`."""

from __future__ import annotations

import os
import time

import torch

from rlad_megatron.rollout.hf_engine import HFEngine


def _hf_config(spec):
    from transformers import AutoConfig

    return AutoConfig.for_model(**{k: v for k, v in spec.hf_config.items() if k != "transformers_version"})


class ReleasingEngine(HFEngine):
    """An HF engine that behaves like colocated SGLang without a CPU backup: `release_memory(["weights"])` throws
    the weights away (zeroes them), and `generate` refuses to run on anything but the weights of the last push."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.weights_dropped, self.last_push, self.pushes = True, None, 0  # dummy weights until the first push

    def release_memory(self, tags=("weights", "kv_cache")) -> None:
        super().release_memory(tags)
        if "weights" in tags:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.zero_()
            self.weights_dropped = True

    def end_weight_update(self, version: str) -> None:
        super().end_weight_update(version)
        self.weights_dropped, self.last_push, self.pushes = False, version, self.pushes + 1

    def generate(self, prompts, sampling):
        assert not self.weights_dropped, f"generate on released weights (last push {self.last_push!r})"
        assert self.weight_version == self.last_push, (self.weight_version, self.last_push)
        return super().generate(prompts, sampling)


def releasing_engine(args, spec, tokenizer):
    return ReleasingEngine(_hf_config(spec), seed=args.seed, tokenizer=tokenizer)


class SlowEngine(HFEngine):
    """Sleeps `RLAD_TEST_SLOW_ENGINE_S` seconds per generate call on global rank 0 (a straggler engine)."""

    def generate(self, prompts, sampling):
        if os.environ.get("RANK", "0") == "0":
            time.sleep(float(os.environ.get("RLAD_TEST_SLOW_ENGINE_S", "0")))
        return super().generate(prompts, sampling)


def slow_engine(args, spec, tokenizer):
    return SlowEngine(_hf_config(spec), seed=args.seed, tokenizer=tokenizer)
