"""torchrun worker (gloo, CPU): vocab-parallel log-probs, entropy and GKD divergences at TP=world vs TP=1.

Launched by ``tests/test_logprobs.py`` with ``--nproc_per_node=2``. Every rank draws the same full ``[T, V]``
logits (same seed), keeps its vocab shard, and compares values and gradients w.r.t. its shard against the TP=1
result on the full logits. Groups tried: WORLD, a ``dist.new_group`` subgroup, per-rank singleton groups (group
rank != global rank on rank 1) and Megatron's TP group (plus a cross-check against ModelOpt's ``LogitsKLLoss``).
Any failed check raises, so the process exits non-zero.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rlad_megatron.losses.gkd import DIVERGENCES, vocab_parallel_divergence
from rlad_megatron.ops.logprobs import vocab_parallel_logprobs


class MaxAllocation(TorchDispatchMode):
    """Records the largest fresh allocation (output storage not shared with an input) of any op but ``allow``."""

    def __init__(self, allow: tuple = ()) -> None:
        super().__init__()
        self.allow, self.max_numel, self.max_op = allow, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.allow:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                numel = t.untyped_storage().nbytes() // t.element_size()
                if numel > self.max_numel:
                    self.max_numel, self.max_op = numel, func
        return out


@contextmanager
def bounded_allocations(limit: int):
    """Fails if any op inside allocates more than ``limit`` elements (the gradient buffer itself is exempt)."""
    mode = MaxAllocation(allow=(torch.ops.aten.empty_like.default,))
    with mode:
        yield
    assert mode.max_numel <= limit, f"{mode.max_op} allocated {mode.max_numel} > {limit} elements"


def shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    v = full.shape[-1] // world
    return full[..., rank * v:(rank + 1) * v].clone()


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 2e-5) -> None:
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"rank {dist.get_rank()}: {what}: max |diff| = {err:.3e} > {tol}"


def logprob_case(group, *, tokens: int, vocab: int, vocab_size: int, temperature: float, chunk: int,
                 dtype: torch.dtype, seed: int) -> None:
    """Log-prob + entropy + their gradients on ``group`` vs TP=1 on the full logits."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(seed)
    full = (3 * torch.randn(tokens, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab_size, (tokens,), generator=g)
    w_lp, w_h = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)
    kw = {"temperature": temperature, "vocab_size": vocab_size, "chunk_size": chunk, "with_entropy": True}

    ref_x = full.clone().requires_grad_(True)
    ref_lp, ref_h = vocab_parallel_logprobs(ref_x, targets, group=None, **kw)
    (w_lp * ref_lp + w_h * ref_h).sum().backward()

    x = shard(full, rank, world).requires_grad_(True)
    before = x.detach().clone()
    lp, h = vocab_parallel_logprobs(x, targets, group=group, **kw)
    (w_lp * lp + w_h * h).sum().backward()
    tag = f"TP={world} V={vocab} vs={vocab_size} T={temperature} {dtype}"
    assert torch.equal(x.detach(), before), f"{tag}: logits modified in place"
    exact = torch.log_softmax(full.double()[:, :vocab_size] / temperature, -1)
    tol = 2e-5 if dtype == torch.float32 else 1e-4
    close(lp, ref_lp, f"{tag} logp vs TP=1", tol)
    close(h, ref_h, f"{tag} entropy vs TP=1", tol)
    close(lp, exact.gather(1, targets[:, None]).squeeze(1), f"{tag} logp vs fp64", tol)
    close(h, -(exact.exp() * exact).sum(-1), f"{tag} entropy vs fp64", tol)
    close(x.grad, shard(ref_x.grad, rank, world), f"{tag} grad vs TP=1", 1e-6 if dtype == torch.float32 else 1e-2)


def divergence_case(group, *, divergence: str, vocab_size: int, temperature: float, seed: int) -> None:
    """GKD divergence + student gradient on ``group`` vs TP=1."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(seed)
    tokens, vocab = 29, 24
    s_full, t_full = 2 * torch.randn(tokens, vocab, generator=g), 2 * torch.randn(tokens, vocab, generator=g)
    w = torch.randn(tokens, generator=g)
    kw = {"divergence": divergence, "beta": 0.3, "temperature": temperature, "vocab_size": vocab_size, "chunk_size": 6}
    ref_x = s_full.clone().requires_grad_(True)
    ref = vocab_parallel_divergence(ref_x, t_full, group=None, **kw)
    (w * ref).sum().backward()
    x = shard(s_full, rank, world).requires_grad_(True)
    out = vocab_parallel_divergence(x, shard(t_full, rank, world), group=group, **kw)
    (w * out).sum().backward()
    tag = f"{divergence} TP={world} vs={vocab_size} T={temperature}"
    close(out, ref, f"{tag} value vs TP=1")
    close(x.grad, shard(ref_x.grad, rank, world), f"{tag} grad vs TP=1", 1e-6)


def check_group(group, label: str) -> None:
    world = dist.get_world_size(group)
    vocab = 16 * world
    for i, (vocab_size, temperature, chunk, dtype) in enumerate([
        (vocab, 1.0, 5, torch.float32),
        (vocab - 5, 0.7, 64, torch.float32),  # padded tail on the last rank, one chunk
        (16 * (world - 1) - 2 if world > 1 else 14, 1.3, 3, torch.float32),  # last rank is all padding
        (vocab - 3, 0.9, 7, torch.bfloat16),
    ]):
        logprob_case(group, tokens=37, vocab=vocab, vocab_size=vocab_size, temperature=temperature, chunk=chunk,
                     dtype=dtype, seed=100 + i)
    for i, div in enumerate(DIVERGENCES):
        divergence_case(group, divergence=div, vocab_size=24 - 3 * i, temperature=1.0 + 0.25 * i, seed=200 + i)
    print(f"rank {dist.get_rank()}: {label} (TP={world}) ok", flush=True)


def check_no_full_vocab(group) -> None:
    """Forward + backward at TP=world never allocates more than chunk x vocab/tp elements (grad buffer aside)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tokens, local, chunk = 64, 40, 8
    full = torch.randn(tokens, local * world)
    targets = torch.randint(0, local * world - 3, (tokens,))
    x = shard(full, rank, world).requires_grad_(True)
    t = shard(torch.randn_like(full), rank, world)
    with bounded_allocations(chunk * local):
        lp, h = vocab_parallel_logprobs(x, targets, group=group, vocab_size=local * world - 3, chunk_size=chunk,
                                        with_entropy=True)
        (lp + h).sum().backward()
        vocab_parallel_divergence(x, t, divergence="jsd", group=group, chunk_size=chunk).sum().backward()
    print(f"rank {dist.get_rank()}: allocations bounded by chunk x vocab/tp", flush=True)


def check_megatron_group() -> None:
    """Megatron's TP group works as ``group``; forward KL matches ModelOpt ``LogitsKLLoss`` (values + grads)."""
    from types import SimpleNamespace

    from megatron.core import parallel_state
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    world, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp = parallel_state.get_tensor_model_parallel_group()
    check_group(tp, "megatron TP group")
    g = torch.Generator().manual_seed(7)
    s, b, vocab = 5, 3, 32
    s_full, t_full = torch.randn(s, b, vocab, generator=g), torch.randn(s, b, vocab, generator=g)
    ours_x = shard(s_full, rank, world).requires_grad_(True)
    ours = vocab_parallel_divergence(ours_x, shard(t_full, rank, world), divergence="forward", group=tp,
                                     temperature=1.5, chunk_size=4)  # [s, b]
    ours.sum().backward()
    mo_x = shard(s_full, rank, world).requires_grad_(True)
    cfg = SimpleNamespace(tensor_model_parallel_size=world)
    partial, tp_reduce, _ = LogitsKLLoss(cfg, temperature=1.5)(mo_x, shard(t_full, rank, world))  # [b, s]
    assert tp_reduce
    partial.sum().backward()  # each rank holds its vocab part of the KL; autograd all-reduce joins the grads
    total = partial.detach().clone()
    dist.all_reduce(total, group=tp)
    close(ours.t(), total, "forward KL vs modelopt LogitsKLLoss", 1e-5)
    close(ours_x.grad, mo_x.grad, "forward KL grad vs modelopt LogitsKLLoss", 1e-6)
    parallel_state.destroy_model_parallel()
    print(f"rank {rank}: megatron TP group + LogitsKLLoss cross-check ok", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world >= 2, "run with torchrun --nproc_per_node>=2"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    check_group(dist.group.WORLD, "WORLD")
    check_group(dist.new_group(list(range(world))), "new_group subgroup")
    singles = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates every group
    check_group(singles[rank], f"singleton group of global rank {rank}")
    check_no_full_vocab(dist.group.WORLD)
    check_megatron_group()
    dist.barrier()
    if rank == 0:
        print("ALL OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
