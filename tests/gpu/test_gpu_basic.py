"""One GPU, local spec: Megatron student vs HF log-probs, bf16 train steps, offload round trip, block FP8 on CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fp32_student_matches_hf(megatron, tiny_hf_dir, hf_reference, kit):
    from rlad_megatron.models.forward import compute_logprobs

    model = kit.build_student(tiny_hf_dir, dtype=torch.float32, use_te=False)
    tokens = kit.random_tokens(4)
    diff = (compute_logprobs(model, tokens)[0] - kit.hf_logprobs(hf_reference, tokens)).abs().max().item()
    print(f"\n[gpu basic] fp32 local spec vs HF: max |logp diff| = {diff:.2e} on {torch.cuda.get_device_name()}")
    assert diff < 2e-3


def test_bf16_local_spec_train_steps(megatron, tiny_hf_dir, hf_reference, kit):
    from rlad_megatron.models.forward import compute_logprobs

    model = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=False)
    tokens = kit.random_tokens()
    diff = (compute_logprobs(model, tokens)[0] - kit.hf_logprobs(hf_reference, tokens)).abs().max().item()
    torch.cuda.reset_peak_memory_stats()
    losses, times, _ = kit.train_steps(model, steps=6, tokens=tokens)
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"\n[gpu basic] bf16 local spec: logp diff vs HF fp32 {diff:.3f}; losses {[round(x, 3) for x in losses]}; "
          f"step {1e3 * sum(times) / len(times):.1f} ms; peak {peak:.0f} MiB")
    assert diff < 0.1  # bf16 weights and activations
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1


def test_offload_frees_gpu_memory_and_restores_state(megatron, tiny_hf_dir, kit):
    from rlad_megatron.offload import Offloader, tensors_of

    model = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=False)
    _, _, (ddp, opt) = kit.train_steps(model, steps=2)  # Adam state exists after a step
    before = {i: t.detach().clone() for i, t in enumerate(tensors_of([ddp, opt]))}
    off = Offloader(backend="move")
    off.register("student", ddp)
    off.register("optimizer", opt)
    torch.cuda.synchronize()
    gone = off.offload("optimizer", "student")
    back = off.onload()
    after = list(tensors_of([ddp, opt]))
    print(f"\n[gpu offload] {gone.storages} storages, {gone.bytes / 2**20:.1f} MiB -> CPU in {1e3 * gone.seconds:.1f} ms "
          f"(allocated {gone.gpu_allocated_before / 2**20:.1f} -> {gone.gpu_allocated_after / 2**20:.1f} MiB); "
          f"back in {1e3 * back.seconds:.1f} ms")
    assert gone.freed >= 0.9 * gone.bytes > 0
    assert all(torch.equal(before[i], t) for i, t in enumerate(after))
    more, _, _ = kit.train_steps(model, steps=1)  # a fresh optimizer over the restored params still trains
    assert torch.isfinite(torch.tensor(more)).all()


def test_frozen_tag_reuses_its_cpu_copy(megatron, tiny_hf_dir, kit):
    from rlad_megatron.offload import Offloader

    teacher = kit.build_student(tiny_hf_dir, dtype=torch.bfloat16, use_te=False)
    ref = [p.detach().clone() for p in teacher.module.parameters()]
    off = Offloader(backend="move")
    off.register("teacher", teacher, frozen=True)
    first = off.offload("teacher")
    off.onload("teacher")
    second = off.offload("teacher")  # no copy: the CPU bytes are kept
    off.onload("teacher")
    print(f"\n[gpu offload] frozen teacher: first offload {1e3 * first.seconds:.1f} ms, "
          f"second {1e3 * second.seconds:.1f} ms")
    assert all(torch.equal(a, b) for a, b in zip(ref, teacher.module.parameters()))


def test_block_fp8_on_cuda_matches_cpu():
    from rlad_megatron.rollout.sglang.fp8_weights import dequantize_block_fp8, quantize_block_fp8

    w = torch.randn(1000, 700, dtype=torch.bfloat16)
    qc, sc = quantize_block_fp8(w)
    qg, sg = quantize_block_fp8(w.cuda())
    assert torch.equal(qc.view(torch.uint8), qg.cpu().view(torch.uint8)) and torch.equal(sc, sg.cpu())
    x = torch.randn(64, 700, device="cuda")
    y_ref = x @ w.cuda().float().t()
    y = x @ dequantize_block_fp8(qg, sg).t()
    rel = ((y - y_ref).norm() / y_ref.norm()).item()
    print(f"\n[gpu fp8] block-FP8 weight, GEMM relative error {rel:.4f}")
    assert rel < 0.05


def test_memory_saver_region_pause_resume():
    from rlad_megatron.offload import Offloader, memory_saver

    if memory_saver() is None:
        pytest.skip("torch_memory_saver is not importable (or too old for CPU backups)")
    off = Offloader()
    with off.region("bulk"):
        x = torch.randn(64 * 2**20 // 4, device="cuda")  # 64 MiB
    ref = x[:4096].clone()
    free0 = torch.cuda.mem_get_info()[0]
    stats = off.offload("bulk")
    free1 = torch.cuda.mem_get_info()[0]
    off.onload("bulk")
    print(f"\n[gpu offload] torch_memory_saver pause freed {(free1 - free0) / 2**20:.0f} MiB in "
          f"{1e3 * stats.seconds:.1f} ms")
    assert free1 - free0 >= 60 * 2**20 and torch.equal(x[:4096], ref)
