"""Colocated SGLang on the training GPU: dummy-weight engine -> bucketed sync from Megatron -> log-prob parity ->
generate -> release / train / staged resume + sync -> parity again. Skips without sglang."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# a submodule: under pytest the bare tests/sglang/ folder imports as an empty namespace package "sglang"
pytest.importorskip("sglang.srt.server_args", reason="sglang is not installed: see docs/sglang_cpu_lane.md (CPU lane) "
                                                     "or pip install -e .[gpu]")


def test_colocated_generate_train_sync_parity(megatron, tiny_hf_dir, kit):
    from rlad_megatron.convert import export_hf_weights
    from rlad_megatron.models.builder import te_available
    from rlad_megatron.models.forward import compute_logprobs
    from rlad_megatron.offload import Offloader, to_rollout, to_training
    from rlad_megatron.rollout.base import SamplingParams
    from rlad_megatron.rollout.sglang.engine import SGLangEngine, check_logprob_parity
    from rlad_megatron.rollout.weight_sync import push_weights

    student = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=te_available())
    engine = SGLangEngine.colocated(tiny_hf_dir, server_kwargs={
        "load_format": "dummy", "dtype": "bfloat16", "mem_fraction_static": 0.3, "random_seed": 0})
    try:
        assert engine.update_dtype == torch.bfloat16

        def sync(version: str):
            return push_weights(engine, export_hf_weights(student), version=version, bucket_bytes=2 * 2**20)

        def parity() -> float:
            probes = kit.random_tokens(4, 64, seed=1)
            ref = compute_logprobs(student, probes)[0]
            return check_logprob_parity(engine, probes.tolist(), list(ref), atol=0.15)

        stats = sync("v0")
        d0 = parity()
        prompts = kit.random_tokens(16, 16, seed=2).tolist()
        t0 = time.perf_counter()
        rollouts = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=64, ignore_eos=True))
        gen_s = time.perf_counter() - t0
        seqs = torch.tensor([r.prompt_ids + r.output_ids for r in rollouts])
        train_lp = compute_logprobs(student, seqs)[0][:, 15:]
        mismatch = (train_lp - torch.tensor([r.output_logprobs for r in rollouts])).abs()

        off = Offloader()
        _, _, (ddp, opt) = kit.train_steps(student, steps=1)
        off.register("student", ddp)
        off.register("optimizer", opt)
        to_training(engine, off)
        losses, _, _ = kit.train_steps(student, steps=2)
        staged = to_rollout(engine, off, lambda: sync("v1"), before_push=("optimizer",))
        d1 = parity()
        freed = off.offload("student")
        off.onload()
        print(f"\n[gpu sglang] sync {stats.buckets} buckets {stats.bytes / 2**20:.1f} MiB in {stats.seconds:.2f} s; "
              f"parity v0 {d0:.3f}, v1 {d1:.3f}; generate 16x64 in {gen_s:.2f} s ({16 * 64 / gen_s:.0f} tok/s); "
              f"rollout-vs-train |dlogp| mean {mismatch.mean():.4f} max {mismatch.max():.3f}; "
              f"offload optimizer {staged[0].bytes / 2**20:.1f} MiB, student {freed.bytes / 2**20:.1f} MiB; "
              f"losses {[round(x, 3) for x in losses]}")
        assert engine.weight_version == "v1" and mismatch.mean() < 0.05
    finally:
        engine.shutdown()
