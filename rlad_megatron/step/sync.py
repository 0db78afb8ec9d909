"""Weight sync and engine memory, the two ends of a rollout phase:

    sync_weights    Megatron model (default: the student) -> HF names (TP gathered, PP broadcast) -> buckets ->
                    engine; with colocated SGLang on GPU in slime's staged order (optimizer + teacher leave the GPU,
                    engine resumes its weights, push, student leaves, engine resumes KV cache + CUDA graphs)
    release_engines the engine is done generating: it releases its memory and the training state comes back

An engine that released its memory holds no weights (SGLang drops them unless it keeps a CPU backup, which is not
enabled here), so `run.engine_holds` is reset on release and the next sync always pushes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.models.builder import Model
from rlad_megatron.models.forward import compute_logprobs
from rlad_megatron.offload import ALL_ENGINE_TAGS, to_rollout, to_training
from rlad_megatron.step.run import Run


def student_label(run: Run) -> str:
    """The weights the engine must hold for the student as it is now (one label per optimizer state)."""
    return f"step{run.state.step}"


def sync_weights(run: Run, model: Model | None = None, label: str | None = None) -> dict:
    """Make the engine hold `model`'s current weights (default: the student's) and be ready to generate.
    A no-op when it already holds them. Returns `perf/sync_*` (and the probe's parity) metrics."""
    label = label or student_label(run)
    if run.engine_holds == label:
        return {}
    out: dict = {}
    if run.offloader is None:
        if run.engine is not None:
            run.engine.resume_memory(ALL_ENGINE_TAGS)
        out = push(run, model, label)
    else:
        to_rollout(run.engine, run.offloader, lambda: out.update(push(run, model, label)),
                   before_push=("optimizer", "teacher"), after_push=("student",))
    run.engine_holds = label
    if run.sync.check and model is None:
        out["rollout/sync_probe_logp_max_diff"] = check_sync(run)
    return out


def release_engines(run: Run) -> None:
    """Generation is over: the colocated engine frees its memory, weights included, and the training state returns.
    Remote engines keep theirs (they share no memory with training)."""
    if run.engine_holds is None:
        return
    if getattr(run.engine, "mode", "colocated") == "remote":
        return
    if run.offloader is not None:
        to_training(run.engine, run.offloader, "student", "optimizer", "teacher")
    elif run.engine is not None:
        run.engine.release_memory(ALL_ENGINE_TAGS)
    run.engine_holds = None


def push(run: Run, model: Model | None, label: str) -> dict:
    """Export (collective: every rank gets the full HF-named tensors) and push into this rank's engine, if it leads
    one: every engine gets its weights from its own rank's copy. A non-leader rank of a TP > 1 SGLang engine pushes
    into its `weight_peer` (the engine TP rank on its GPU loads that rank's buffer). Remote servers get them from
    rank 0; the other ranks (clients of the same servers) wait for that push before they generate."""
    from rlad_megatron.convert import export_hf_weights
    from rlad_megatron.rollout.weight_sync import push_weights

    t0 = time.perf_counter()
    stream = export_hf_weights(model or run.policy.model)
    target = run.engine if getattr(run.engine, "receives_weights", True) else None
    target = target if target is not None else run.weight_peer
    out = {"perf/sync_s": 0.0}
    if target is not None:
        stats = push_weights(target, stream, version=label, bucket_bytes=run.sync.bucket_bytes)
        out["perf/sync_buckets"] = float(stats.buckets)
    else:
        for _ in stream:
            pass
    if getattr(run.engine, "mode", None) == "remote":
        platform.barrier()
    out["perf/sync_s"] = time.perf_counter() - t0
    return out


def check_sync(run: Run) -> float:
    """Every engine's log-probs of a fixed probe sequence vs the Megatron student's (after a sync): the max gap."""
    probe = run.eval_prompts[0] if run.eval_prompts else run.train_prompts.samples[0]
    ids = list(probe.prompt_ids) + [run.pad_id] * 4
    ref, _ = compute_logprobs(run.policy.model, torch.tensor([ids]), temperature=1.0)
    diff = torch.zeros((), dtype=torch.float64)
    if run.engine is not None:
        eng = run.engine.score([ids], [len(probe.prompt_ids)], temperature=1.0)[0]
        diff = (torch.tensor(eng, dtype=torch.float64) - ref[0, len(probe.prompt_ids) - 1:]).abs().max()
    if dist.is_initialized():
        diff = diff.to(platform.device())
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)

