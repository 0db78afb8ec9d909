"""weight_sync: bucketing, flat-buffer packing, and push_weights into an HFEngine."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlad_megatron.rollout.base import WeightUpdateError
from rlad_megatron.rollout.hf_engine import HFEngine
from rlad_megatron.rollout.weight_sync import (
    ALIGN_BYTES,
    FlattenedBucket,
    iter_buckets,
    push_weights,
    tensor_bytes,
)

torch.set_num_threads(1)


def tiny_config(**kw) -> Qwen2Config:
    return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, **kw)


def random_model(seed: int) -> Qwen2ForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(tiny_config()).eval()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (bit-exact comparison, NaN payloads and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.0])
    return [
        ("fp32", torch.randn(3, 5, generator=g)),
        ("bf16_odd", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("fp16", torch.randn(2, 3, 1, generator=g).to(torch.float16)),
        ("special", special),
        ("fp64_scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("int64", torch.arange(-2, 3, dtype=torch.int64)),
        ("int8", torch.tensor([-128, 0, 127], dtype=torch.int8)),
        ("bool", torch.tensor([True, False, True])),
        ("transposed", torch.randn(4, 6, generator=g).t()),  # non-contiguous input
        ("empty", torch.zeros(0, 4)),
        ("bf16_after_odd", torch.randn(5, generator=g).to(torch.bfloat16)),
    ]


# ------------------------------------------------------------------------------------------- iter_buckets
def test_iter_buckets_bounds_sizes_and_keeps_order():
    g = torch.Generator().manual_seed(1)
    named = [(f"t{i}", torch.zeros(int(n))) for i, n in enumerate(torch.randint(1, 400, (60,), generator=g))]
    limit = 1024  # 256 fp32 values: some tensors exceed it
    buckets = list(iter_buckets(named, limit))
    flat = [item for b in buckets for item in b]
    assert [n for n, _ in flat] == [n for n, _ in named]
    assert all(a is b for (_, a), (_, b) in zip(flat, named))  # no copies
    sizes = [sum(tensor_bytes(t) for _, t in b) for b in buckets]
    assert all(s <= limit or len(b) == 1 for s, b in zip(sizes, buckets))
    assert any(s > limit for s in sizes)  # the oversized tensors got buckets of their own
    for s, nxt in zip(sizes, buckets[1:]):  # greedy: a bucket is closed only when the next tensor does not fit
        assert s + tensor_bytes(nxt[0][1]) > limit
    assert list(iter_buckets([], 16)) == []
    with pytest.raises(ValueError):
        list(iter_buckets(named, 0))


def test_iter_buckets_is_lazy():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield f"t{i}", torch.zeros(4)  # 16 bytes

    first = next(iter_buckets(source(), 64))
    assert len(first) == 4 and len(pulled) == 5  # one tensor of look-ahead, not the whole export


# ---------------------------------------------------------------------------------------- FlattenedBucket
def test_flattened_bucket_round_trip_is_bit_exact():
    named = mixed_tensors()
    bucket = FlattenedBucket.from_named_tensors(named)
    assert bucket.flat.dtype == torch.uint8 and bucket.flat.dim() == 1 and bucket.flat.is_contiguous()
    ends = [m.offset + m.nbytes for m in bucket.metadata]
    assert all(m.offset % ALIGN_BYTES == 0 for m in bucket.metadata)
    assert all(e <= m.offset for e, m in zip(ends, bucket.metadata[1:]))  # no overlap, in order
    assert bucket.nbytes < sum(tensor_bytes(t) for _, t in named) + ALIGN_BYTES * len(named)
    # the receiver rebuilds from (flat, metadata) alone, e.g. after an IPC hop
    received = FlattenedBucket(bucket.flat.clone(), list(bucket.metadata)).to_named_tensors()
    for (name, t), (rname, r), m in zip(named, received, bucket.metadata):
        assert rname == name == m.name and r.dtype == t.dtype and r.shape == t.shape
        assert torch.equal(bits(r), bits(t)), name
        assert torch.equal(bucket.flat[m.offset : m.offset + m.nbytes], bits(t))  # SGLang start/end byte slice


def test_flattened_bucket_views_alias_the_buffer_and_cast():
    named = mixed_tensors()
    bucket = FlattenedBucket.from_named_tensors(named, dtype=torch.bfloat16)
    for (name, t), (_, r) in zip(named, bucket.to_named_tensors()):
        expect = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert r.dtype == expect.dtype and torch.equal(bits(r), bits(expect)), name
    view = bucket.views()[0]
    bucket.flat.zero_()
    assert (view == 0).all()  # views, not copies


def test_flattened_bucket_packs_into_a_reused_staging_buffer():
    named = mixed_tensors()
    _, need = FlattenedBucket.layout(named)
    staging = torch.full((need + 100,), 7, dtype=torch.uint8)
    bucket = FlattenedBucket.from_named_tensors(named, out=staging)
    assert bucket.flat.data_ptr() == staging.data_ptr() and bucket.nbytes == need
    for (name, t), (_, r) in zip(named, bucket.to_named_tensors()):
        assert torch.equal(bits(r), bits(t)), name
    with pytest.raises(ValueError, match=f">= {need} bytes"):
        FlattenedBucket.from_named_tensors(named, out=staging[: need - 1])


def test_flattened_bucket_rejects_bad_buffers():
    bucket = FlattenedBucket.from_named_tensors([("a", torch.ones(8))])
    with pytest.raises(ValueError, match="uint8"):
        FlattenedBucket(bucket.flat.view(torch.float32), bucket.metadata)
    with pytest.raises(ValueError, match="needs 32 bytes"):
        FlattenedBucket(bucket.flat[:16], bucket.metadata)


# ------------------------------------------------------------------------------------------- push_weights
class SpyEngine:
    """Delegates to an HFEngine and records what each update_weights call received."""

    def __init__(self, engine: HFEngine, repack: bool = False, update_dtype: torch.dtype | None = None) -> None:
        self.engine, self.repack, self.update_dtype, self.calls = engine, repack, update_dtype, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def update_weights(self, named_tensors):
        named = list(named_tensors)
        self.calls.append([(n, t.dtype, tensor_bytes(t)) for n, t in named])
        if self.repack:  # what an SGLang-style backend does: one flat buffer per bucket, rebuilt on the far side
            named = FlattenedBucket.from_named_tensors(named).to_named_tensors()
        self.engine.update_weights(named)


@torch.no_grad()
def check_weights(engine: HFEngine, src: torch.nn.Module, dtype: torch.dtype) -> None:
    got = dict(engine.model.named_parameters())
    for name, p in src.named_parameters():
        assert torch.equal(got[name], p.to(dtype)), name


@pytest.mark.parametrize("repack", [False, True])
def test_push_weights_loads_every_tensor(repack):
    src = random_model(2)
    spy = SpyEngine(HFEngine(tiny_config(), seed=0), repack=repack)
    params = list(src.named_parameters())
    limit = 64 * 1024
    stats = push_weights(spy, iter(params), version="v3", bucket_bytes=limit)
    assert stats.tensors == len(params) and stats.bytes == sum(tensor_bytes(t) for _, t in params)
    assert stats.buckets == len(spy.calls) == len(list(iter_buckets(params, limit))) > 1
    assert [n for call in spy.calls for n, _, _ in call] == [n for n, _ in params]
    assert all(sum(b for _, _, b in call) <= limit or len(call) == 1 for call in spy.calls)
    assert spy.engine.weight_version == "v3" and spy.engine.health() and stats.seconds > 0
    check_weights(spy.engine, src, torch.float32)
    seq = torch.arange(3, 15)
    with torch.no_grad():
        expect = torch.log_softmax(src(seq[None]).logits[0, 3:-1], -1).gather(-1, seq[4:, None])[:, 0]
    assert (torch.tensor(spy.engine.score([seq.tolist()], [4])[0]) - expect).abs().max() < 1e-4


def test_push_weights_casts_to_the_dtype_the_engine_asks_for():
    src = random_model(2)
    fp32_bytes = sum(tensor_bytes(p) for p in src.parameters())
    asks = SpyEngine(HFEngine(tiny_config(), seed=0, dtype=torch.bfloat16), update_dtype=torch.bfloat16)
    stats = push_weights(asks, src.named_parameters(), version="bf16")
    assert stats.buckets == 1 and stats.bytes * 2 == fp32_bytes
    assert {dt for call in asks.calls for _, dt, _ in call} == {torch.bfloat16}  # cast before sending
    check_weights(asks.engine, src, torch.bfloat16)
    # HFEngine itself asks for nothing (update_dtype None) and casts inside its in-place copy
    plain = SpyEngine(HFEngine(tiny_config(), seed=0, dtype=torch.bfloat16))
    assert plain.engine.update_dtype is None
    stats = push_weights(plain, src.named_parameters(), version="fp32-in")
    assert stats.bytes == fp32_bytes and {dt for call in plain.calls for _, dt, _ in call} == {torch.float32}
    check_weights(plain.engine, src, torch.bfloat16)
    explicit = SpyEngine(HFEngine(tiny_config(), seed=0))  # an explicit dtype wins over the engine's choice
    push_weights(explicit, src.named_parameters(), version="fp16", dtype=torch.float16)
    assert {dt for call in explicit.calls for _, dt, _ in call} == {torch.float16}
    check_weights(explicit.engine, src.to(torch.float16), torch.float32)


def test_push_weights_errors_propagate_and_a_later_push_recovers():
    src = random_model(2)
    engine = HFEngine(tiny_config(), seed=0)
    params = list(src.named_parameters())
    with pytest.raises(WeightUpdateError, match="unknown parameter 'model.extra.weight'"):
        push_weights(engine, params + [("model.extra.weight", torch.zeros(2))], version="bad", bucket_bytes=4096)
    assert not engine.health() and engine.weight_version == "default"  # earlier buckets were written
    with pytest.raises(WeightUpdateError, match="model.norm.weight"):
        push_weights(engine, [(n, t) for n, t in params if n != "model.norm.weight"], version="bad")
    stats = push_weights(engine, params, version="good")
    assert stats.tensors == len(params) and engine.health() and engine.weight_version == "good"
    check_weights(engine, src, torch.float32)
