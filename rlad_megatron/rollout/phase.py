"""The engine side of a step: push the Megatron weights to the rollout engine (bucketed, HF names) and,
with colocated SGLang on GPU, stage GPU memory between training state and the engine."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.components import Components, pad_id
from rlad_megatron.models.forward import compute_logprobs


@contextmanager
def rollout_phase(c: Components, version: str, model=None):
    """The engine holds current weights inside the block. Colocated SGLang on GPU: optimizer and teacher
    leave GPU memory, the engine resumes its weights, the student is pushed and leaves too, the engine
    resumes its KV cache; on exit the engine releases everything and training state comes back."""
    if c.extra.get("engine_stale"):
        if c.offloader is None:
            c.extra["sync_metrics"] = sync_weights(c, version, model)
        else:
            from rlad_megatron.offload import to_rollout

            out = {}
            to_rollout(c.engine, c.offloader, lambda: out.update(sync_weights(c, version, model)),
                       before_push=("optimizer", "teacher"), after_push=("student",))
            c.extra["sync_metrics"] = out
    elif c.offloader is not None:
        c.offloader.offload("optimizer", "teacher", "student")
        if c.engine is not None:
            c.engine.resume_memory(("weights", "kv_cache", "cuda_graph"))
    try:
        yield
    finally:
        if c.offloader is not None:
            from rlad_megatron.offload import to_training

            to_training(c.engine, c.offloader, "student", "optimizer", "teacher")


def sync_weights(c: Components, version: str, model=None) -> dict:
    """Megatron model (default: the student) -> HF-named full tensors (TP gathered, PP broadcast) -> buckets
    -> engine."""
    from rlad_megatron.convert import export_hf_weights
    from rlad_megatron.rollout.weight_sync import push_weights

    c.extra["engine_stale"] = False
    t0 = time.perf_counter()
    stream = export_hf_weights(model or c.student)
    if platform.is_rank0():
        stats = push_weights(c.engine, stream, version=version, bucket_bytes=c.args.update_weight_buffer_size)
        out = {"sync/seconds": stats.seconds, "sync/buckets": float(stats.buckets)}
    else:
        for _ in stream:
            pass
        out = {}
    if c.args.check_weight_sync and model is None:
        out["sync/probe_logp_max_diff"] = check_sync(c)
    out.setdefault("sync/seconds", time.perf_counter() - t0)
    return out


def check_sync(c: Components) -> float:
    """Engine log-probs of a fixed probe sequence vs the Megatron student's (after a sync)."""
    probe = c.eval_prompts[0] if c.eval_prompts else c.train_prompts.samples[0]
    ids = list(probe.prompt_ids) + [pad_id(c)] * 4
    ref, _ = compute_logprobs(c.student, torch.tensor([ids]), temperature=1.0)
    diff = [0.0]
    if platform.is_rank0():
        eng = c.engine.score([ids], [len(probe.prompt_ids)], temperature=1.0)[0]
        mine = ref[0, len(probe.prompt_ids) - 1:]
        diff = [float((torch.tensor(eng) - mine).abs().max())]
    dist.broadcast_object_list(diff, src=0)
    return diff[0]

