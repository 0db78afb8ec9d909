"""Single-process checks of the platform and model-description layers: the CPU RNG-states tracker,
`spec_from_hf_config` (and its errors), `padded_vocab_size`, the parallel-size checks of `build_model`,
`Layout` validation and the teacher's process-group layout. Nothing here initialises torch.distributed or
Megatron's parallel state (the few collective entry points are driven with stand-in groups); the same
errors raised inside a real 2-rank process group are checked by tests/test_models.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlad_megatron import platform
from rlad_megatron.models.families import padded_vocab_size, spec_from_hf_config
from rlad_megatron.platform import CpuRNGStatesTracker, Layout

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}


@pytest.fixture(autouse=True)
def keep_rng_state():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


# ---------------------------------------------------------------------------------------------- RNG tracker


def test_rng_tracker_fork_advances_inside_and_leaves_outside_alone():
    tracker = CpuRNGStatesTracker()
    assert not tracker.is_initialized()
    tracker.add("model-parallel-rng", 123)
    assert tracker.is_initialized()
    torch.manual_seed(0)
    with tracker.fork():  # the default name
        a = torch.rand(4)
    outside = torch.rand(4)
    with tracker.fork("model-parallel-rng"):
        b = torch.rand(4)
    outside2 = torch.rand(4)
    torch.manual_seed(123)
    expected_a, expected_b = torch.rand(4), torch.rand(4)
    # inside: the named stream continues where the last fork left it
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b)
    # outside: the default stream is exactly as if no fork had happened
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(4)) and torch.equal(outside2, torch.rand(4))


def test_rng_tracker_fork_restores_on_error_and_keeps_the_advance():
    tracker = CpuRNGStatesTracker()
    tracker.add("s", 7)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    with pytest.raises(ValueError), tracker.fork("s"):
        first = torch.rand(2)
        raise ValueError
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork("s"):
        second = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(2)) and torch.equal(second, torch.rand(2))


def test_rng_tracker_states_round_trip_and_reset():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    tracker.add("b", 2)
    tracker.get_states()["a"].zero_()  # get_states returns copies: the stream is untouched
    with tracker.fork("a"):
        x = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(x, torch.rand(3))
    saved = tracker.get_states()
    with tracker.fork("a"):
        y = torch.rand(3)
    tracker.reset()
    assert not tracker.is_initialized()
    tracker.set_states(saved)  # replays the streams from the saved point
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), y)
    tracker.reset()
    tracker.add("a", 1)  # names and seeds are free again after reset


def test_rng_tracker_rejects_duplicates_and_unknown_names():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 5)
    with pytest.raises(RuntimeError, match="seed 5 already exists"):
        tracker.add("b", 5)
    with pytest.raises(RuntimeError, match="rng state a already exists"):
        tracker.add("a", 6)
    with pytest.raises(RuntimeError, match="rng state nope is not added"), tracker.fork("nope"):
        pass


# ------------------------------------------------------------------------------------ spec_from_hf_config


def test_spec_from_hf_config_families_and_defaults(tmp_path: Path):
    spec = spec_from_hf_config(QWEN2)
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.ffn_hidden_size) == ("qwen2", 2, 64, 128)
    assert (spec.num_attention_heads, spec.num_query_groups, spec.kv_channels, spec.vocab_size) == (4, 2, 16, 100)
    assert spec.qkv_bias and not spec.qk_layernorm and not spec.tie_word_embeddings
    assert spec.rope_theta == 10000.0 and spec.rope_scaling is None

    no_kv = {k: v for k, v in QWEN2.items() if k != "num_key_value_heads"}
    assert spec_from_hf_config(no_kv).num_query_groups == 4  # MHA when absent

    qwen3 = spec_from_hf_config({**QWEN2, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32,
                                 "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 1e6}})
    assert qwen3.family == "qwen3" and qwen3.qk_layernorm and not qwen3.qkv_bias
    assert qwen3.kv_channels == 32 and qwen3.tie_word_embeddings and qwen3.rope_theta == 1e6

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    llama = spec_from_hf_config({**QWEN2, "architectures": ["LlamaForCausalLM"], "attention_bias": True,
                                 "rope_parameters": rope})
    assert llama.family == "llama" and llama.qkv_bias and llama.rope_theta == 5e5
    assert llama.rope_scaling == {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")}

    (tmp_path / "config.json").write_text(json.dumps(QWEN2))
    assert spec_from_hf_config(tmp_path) == spec == spec_from_hf_config(tmp_path / "config.json")


@pytest.mark.parametrize(("edit", "message"), [
    ({"architectures": ["MistralForCausalLM"]},
     ("architectures='MistralForCausalLM' is not supported; expected one of "
      "['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM']")),
    ({"architectures": []}, "'architectures' must list exactly one class"),
    ({"architectures": None}, "'architectures' must list exactly one class"),
    ({"architectures": ["Qwen2ForCausalLM", "LlamaForCausalLM"]}, "'architectures' must list exactly one class"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4},
     "num_attention_heads=6 not divisible by num_key_value_heads=4"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
])
def test_spec_from_hf_config_rejects_bad_configs(edit: dict, message: str):
    with pytest.raises(ValueError) as err:
        spec_from_hf_config({**QWEN2, **edit})
    assert message in str(err.value)


@pytest.mark.parametrize("field", ["num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size",
                                   "vocab_size"])
def test_spec_from_hf_config_names_a_missing_field(field: str):
    cfg = {k: v for k, v in QWEN2.items() if k != field}
    with pytest.raises(ValueError, match=f"config.json: field '{field}' is missing \\(needed for Qwen2ForCausalLM\\)"):
        spec_from_hf_config(cfg)


def test_spec_from_hf_config_missing_file(tmp_path: Path):
    with pytest.raises(ValueError, match="config.json: no such file"):
        spec_from_hf_config(tmp_path)


@pytest.mark.parametrize(("vocab", "tp", "divisible_by", "expected"), [
    (100, 1, 128, 128), (100, 2, 128, 256), (128, 1, 128, 128), (129, 1, 128, 256), (256, 2, 128, 256),
    (257, 2, 128, 512), (151936, 1, 128, 151936), (151936, 8, 128, 152576), (100, 3, 64, 192), (1, 4, 1, 4),
])
def test_padded_vocab_size(vocab: int, tp: int, divisible_by: int, expected: int):
    assert padded_vocab_size(vocab, tp, divisible_by) == expected


# ------------------------------------------------------------------------------------ parallel-size checks


class FakeGroup:
    """Stands in for a ProcessGroup where only `size()` / `rank()` / the member ranks are read."""

    def __init__(self, size: int = 1, rank: int = 0, ranks: list[int] | None = None) -> None:
        self._size, self._rank, self.ranks = size, rank, ranks

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize(("tp", "pp", "edit", "kwargs", "message"), [
    (3, 1, {}, {}, "num_attention_heads=4 is not divisible by tensor-model-parallel size 3"),
    (4, 1, {}, {}, "num_key_value_heads=2 is not divisible by tensor-model-parallel size 4"),
    (2, 1, {"num_key_value_heads": 1}, {}, "num_key_value_heads=1 is not divisible by tensor-model-parallel size 2"),
    (1, 3, {}, {}, "num_hidden_layers=2 is not divisible by pipeline-model-parallel size 3"),
    (1, 1, {}, {"padded_vocab": 99}, "padded vocab 99 must be >= 100 and divisible by TP=1"),
    (2, 1, {}, {"padded_vocab": 129}, "padded vocab 129 must be >= 100 and divisible by TP=2"),
])
def test_build_model_rejects_sizes_that_do_not_divide(tp: int, pp: int, edit: dict, kwargs: dict, message: str):
    from rlad_megatron.models.builder import build_model

    spec = spec_from_hf_config({**QWEN2, **edit})
    pg = SimpleNamespace(tp=FakeGroup(tp), pp=FakeGroup(pp))
    with pytest.raises(ValueError) as err:
        build_model(spec, pg=pg, use_te=False, **kwargs)
    assert message in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_build_model_refuses_transformer_engine_on_cpu():
    from rlad_megatron.models.builder import build_model

    pg = SimpleNamespace(tp=FakeGroup(1), pp=FakeGroup(1))
    with pytest.raises(RuntimeError, match="Transformer Engine layer spec was requested"):
        build_model(spec_from_hf_config(QWEN2), pg=pg, use_te=True)


def test_layout_defaults_and_is_frozen():
    assert Layout() == Layout(tp=1, pp=1, cp=1, vpp=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Layout().tp = 2  # type: ignore[misc]


@pytest.mark.parametrize(("layout", "message"), [
    (Layout(tp=3), "world size 2 is not divisible by TP*PP*CP = 3*1*1"),
    (Layout(tp=2, pp=2), "world size 2 is not divisible by TP*PP*CP = 2*2*1"),
    (Layout(cp=4), "world size 2 is not divisible by TP*PP*CP = 1*1*4"),
])
def test_layout_must_divide_the_world(monkeypatch, layout: Layout, message: str):
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(platform.dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda *a, **k: pytest.fail("must fail before this"))
    with pytest.raises(ValueError) as err:
        platform.initialize_parallel(layout)
    assert str(err.value) == message


def _fake_world(monkeypatch, world: int, rank: int) -> list[list[int]]:
    calls: list[list[int]] = []

    def new_group(ranks: list[int], *a, **k) -> FakeGroup:
        calls.append(list(ranks))
        return FakeGroup(len(ranks), ranks.index(rank) if rank in ranks else -1, list(ranks))

    monkeypatch.setattr(platform.dist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(platform.dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(platform.dist, "new_group", new_group)
    return calls


def test_teacher_process_groups_follow_megatron_rank_order(monkeypatch):
    """world 8, teacher TP=2 x PP=2 (so DP=2): tp fastest, then dp, then pp; every rank creates the same
    groups in the same order (new_group is collective)."""
    calls = _fake_world(monkeypatch, 8, 5)  # rank 5 = pp 1, dp 0, tp 1
    pg = platform.make_process_groups(2, 2)
    assert pg.tp.ranks == [4, 5] and pg.pp.ranks == [1, 5] and pg.dp.ranks == [5, 7]
    assert pg.mp.ranks == [0, 1, 4, 5] and pg.embd.ranks == [1, 5] and pg.tp_dp_cp.ranks == [4, 5, 6, 7]
    assert pg.cp.ranks == [5] and pg.pos_embd.ranks == [1, 5]
    assert (pg.tp.rank(), pg.pp.rank(), pg.dp.rank()) == (1, 1, 0)
    seen_by_5 = list(calls)
    calls0 = _fake_world(monkeypatch, 8, 0)
    platform.make_process_groups(2, 2)
    assert calls0 == seen_by_5


def test_teacher_layout_must_divide_the_world(monkeypatch):
    calls = _fake_world(monkeypatch, 4, 0)
    with pytest.raises(ValueError, match=r"teacher TP\*PP = 3\*1 does not divide the world size 4"):
        platform.make_process_groups(3)
    assert calls == [], "no group may be created before the check (the other ranks would hang)"


# ---------------------------------------------------------------------------------------------- CPU layer


def test_native_torch_turns_the_cuda_to_cpu_mode_off_inside_and_back_on_after():
    """Megatron's `device="cuda"` maps to CPU under the CPU layer's mode; `native_torch` (around the engines' decode
    loops) runs plain torch, and restores the mode after, also on an error. Without the mode it does nothing."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with platform._CudaToCpu():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        with platform.native_torch(), pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        with pytest.raises(ValueError), platform.native_torch():
            raise ValueError("inside")
        assert torch.zeros(2, device="cuda").device.type == "cpu"
    with platform.native_torch():
        assert torch.zeros(2).sum() == 0
