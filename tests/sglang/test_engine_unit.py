"""The SGLang engine's pure parts on CPU, without sglang: flag pass-through, SGLang output -> Rollout, prefill
alignment, parity check, the trainer side of the weight group (gloo), the never-hang wait, offload mechanics."""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlad_megatron.offload import Offloader, offload_storages, onload_storages, tensors_of, to_rollout, to_training
from rlad_megatron.rollout.base import SamplingParams, WeightUpdateError
from rlad_megatron.rollout.sglang.args import (
    add_sglang_args,
    parse_sglang_argv,
    parse_version,
    server_cli_argv,
    sglang_available,
    sglang_kwargs_from_args,
)
from rlad_megatron.rollout.sglang.engine import (
    LogprobParityError,
    SGLangEngine,
    check_logprob_parity,
    init_weight_group,
    rollout_from_output,
    sampling_dict,
)
from rlad_megatron.rollout.sglang.io import _tail_logprobs
from rlad_megatron.rollout.sglang.remote import _wait_all

no_sglang = pytest.mark.skipif(sglang_available(), reason="checks behaviour without sglang installed")


# ------------------------------------------------------------------------------------------------ args


def test_parse_version():
    assert parse_version("0.5.21.post1") == (0, 5, 21) and parse_version("0.5.23rc0") == (0, 5, 23)
    assert parse_version("0.4.10") < (0, 5, 21) <= parse_version("0.5.21")


def test_generic_sglang_flags_pass_through():
    argv = ["--sglang-mem-fraction-static", "0.6", "--sglang-enable-memory-saver", "--sglang-cuda-graph-bs", "1",
            "2", "4", "--sglang-attention-backend=fa3", "--sglang-log-level", "warning", "--sglang-disable-radix-cache",
            "false"]
    assert parse_sglang_argv(argv) == {"mem_fraction_static": 0.6, "enable_memory_saver": True,
                                       "cuda_graph_bs": [1, 2, 4], "attention_backend": "fa3",
                                       "log_level": "warning", "disable_radix_cache": False}
    with pytest.raises(ValueError, match="only --sglang-"):
        parse_sglang_argv(["--sglang-tp-size", "2", "--lr", "1"])
    with pytest.raises(ValueError, match="before any"):
        parse_sglang_argv(["2"])


def test_remote_engine_flags_and_their_old_names():
    pytest.importorskip("megatron.core", reason="the project's argument parser imports Megatron (not in the lane venv)")
    from rlad_megatron.arguments import parse_args

    base = ["--algo", "grpo", "--student-hf", "m", "--prompt-data", "builtin:addition", "--rollout-engine",
            "sglang-remote"]
    args = parse_args([*base, "--sglang-server-url", "http://a:1", "--sglang-server-url", "http://b:2", "http://c:3",
                       "--sglang-router-url", "http://r:9"])
    assert args.sglang_server_url == ["http://a:1", "http://b:2", "http://c:3"] and args.sglang_router_url == "http://r:9"
    old = parse_args([*base, "--sglang-urls", "http://a:1", "--rollout-router-url", "http://r:9"])
    assert old.sglang_server_url == ["http://a:1"] and old.sglang_router_url == "http://r:9"
    assert old.rollout_max_inflight == 64 and old.sglang_extra == []
    with pytest.raises(ValueError, match="--sglang-router-url URL and/or --sglang-server-url"):
        parse_args(base)
    with pytest.raises(ValueError, match="--rollout-max-inflight"):
        parse_args([*base, "--sglang-urls", "http://a:1", "--rollout-max-inflight", "0"])


@no_sglang
def test_cli_without_sglang_keeps_working():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sglang-urls", nargs="*", default=[])
    add_sglang_args(parser)  # nothing to introspect: a no-op
    args, rest = parser.parse_known_args(["--sglang-urls", "http://h:1", "--sglang-tp-size", "2",
                                          "--sglang-enable-memory-saver"])
    assert args.sglang_urls == ["http://h:1"]
    args.sglang_extra = rest
    assert sglang_kwargs_from_args(args) == {"tp_size": 2, "enable_memory_saver": True}


def test_server_cli_argv():
    assert server_cli_argv({"model_path": "/m", "tp_size": 2, "enable_memory_saver": True, "disable_radix_cache": False,
                            "cuda_graph_bs": [1, 2], "json_model_override_args": {"a": 1}, "chat_template": None}) == [
        "--model-path", "/m", "--tp-size", "2", "--enable-memory-saver", "--cuda-graph-bs", "1", "2",
        "--json-model-override-args", '{"a": 1}']


@no_sglang
def test_colocated_engine_without_sglang_says_how_to_install(tmp_path):
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[gpu\]"):
        SGLangEngine.colocated(tmp_path)


# ---------------------------------------------------------------------------------- outputs -> Rollout


def test_sampling_dict():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, stop_token_ids=(7,), seed=3)
    assert sampling_dict(sp) == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 5,
                                 "ignore_eos": False, "no_stop_trim": True, "stop_token_ids": [7]}
    # SGLang's ignore_eos would also disable stop_token_ids: they are applied client-side instead
    assert "stop_token_ids" not in sampling_dict(SamplingParams(ignore_eos=True, stop_token_ids=(7,)))
    assert sampling_dict(sp, seed=11)["sampling_seed"] == 11


def out(ids, lps, reason="length", matched=None):
    fr = {"type": reason} if matched is None else {"type": reason, "matched": matched}
    return {"output_ids": ids[:-1] if reason == "stop" else ids,  # SGLang may trim the stop token here
            "meta_info": {"output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)], "finish_reason": fr,
                          "weight_version": "default"}}


def test_rollout_from_output_uses_the_logprob_triples():
    r = rollout_from_output([1, 2], out([5, 6, 2], [-1.0, -2.0, -0.5], "stop", 2), "v3")
    assert (r.prompt_ids, r.output_ids, r.output_logprobs, r.finish_reason, r.weight_version) == (
        [1, 2], [5, 6, 2], [-1.0, -2.0, -0.5], "stop", "v3")
    assert r.meta == {"prompt_tokens": 2, "completion_tokens": 3, "matched": 2, "engine_weight_version": "default"}
    r = rollout_from_output([1], out([5, 7, 8, 7], [-1.0, -2.0, -3.0, -4.0]), "v", client_stop_ids=(7,))
    assert (r.output_ids, r.output_logprobs, r.finish_reason, r.meta["matched"]) == ([5, 7], [-1.0, -2.0], "stop", 7)
    with pytest.raises(RuntimeError, match="without log-probs"):
        rollout_from_output([1], {"output_ids": [3], "meta_info": {}}, "v")


def test_prefill_logprob_alignment():
    seq = [10, 11, 511, 13]
    entries = [(None, 11, None), (-1.0, 0, None), (-2.0, 13, None)]  # 511 reported as 0 (SGLang quirk)
    assert _tail_logprobs(entries, seq, 2) == entries[1:]
    assert _tail_logprobs(entries, seq, 0) == []
    with pytest.raises(RuntimeError, match="line up"):
        _tail_logprobs(entries, seq, 3)  # the None entry
    with pytest.raises(RuntimeError, match="line up"):
        _tail_logprobs([(None, 1, None), (-1.0, 99, None)], [1, 2], 1)


class Scorer:
    """Test double: an engine whose prefill log-probs are given."""

    weight_version = "v9"

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def score(self, seqs, prompt_lens, temperature=1.0):
        self.calls.append((seqs, list(prompt_lens), temperature))
        return self.rows


def test_check_logprob_parity():
    eng = Scorer([[-1.0, -2.0], [-0.5]])
    diff = check_logprob_parity(eng, [[1, 2, 3], [4, 5]], [torch.tensor([-1.001, -2.0]), [-0.5]], atol=0.01)
    assert diff == pytest.approx(0.001, abs=1e-6)
    assert eng.calls[0][1] == [1, 1]  # prompt_lens = len(probe) - len(reference)
    with pytest.raises(LogprobParityError, match="v9"):
        check_logprob_parity(eng, [[1, 2, 3], [4, 5]], [[-1.0, -2.5], [-0.5]], atol=0.1)
    assert issubclass(LogprobParityError, WeightUpdateError)


# ------------------------------------------------------------------------------- weight group and waits


PEER = """
import sys, torch
from rlad_megatron.rollout.sglang.engine import init_weight_group
pg = init_weight_group("gloo", "127.0.0.1", int(sys.argv[1]), 2, 1, sys.argv[2], 60, prefer_sglang=False)
t = torch.zeros(4)
torch.distributed.broadcast(t, src=0, group=pg)
print(t.tolist())
"""


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_torch_only_weight_group_broadcasts_over_gloo(monkeypatch, under_torchrun):
    """The trainer side of the engines' group, built without sglang, is a working gloo group (the peer process
    stands in for an engine rank), also in a trainer launched by torchrun, whose agent store would otherwise turn
    the group's store host into a client."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_USE_AGENT_STORE"}
    if under_torchrun:
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    name = f"unit_group_{int(under_torchrun)}"
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(port), name], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pg = init_weight_group("gloo", "127.0.0.1", port, 2, 0, name, 60, prefer_sglang=False)
        torch.distributed.broadcast(torch.arange(4.0), src=0, group=pg, async_op=True).wait()
        stdout, _ = peer.communicate(timeout=60)
    finally:
        peer.kill()
    assert stdout.strip().splitlines()[-1] == "[0.0, 1.0, 2.0, 3.0]"


class NeverDone:
    def is_completed(self) -> bool:
        return False


def test_refused_update_fails_fast_and_a_stuck_one_times_out():
    pool = ThreadPoolExecutor(2)

    def refuse():
        time.sleep(0.05)
        raise WeightUpdateError("update_weights_from_distributed must run between begin_weight_update() and ...")

    t0 = time.perf_counter()
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        _wait_all([pool.submit(refuse)], 60, "update", works=[NeverDone()])
    assert time.perf_counter() - t0 < 5
    with pytest.raises(WeightUpdateError, match="did not complete within"):
        _wait_all([pool.submit(lambda: None)], 0.2, "update", works=[NeverDone()])
    with pytest.raises(WeightUpdateError, match="boom"):
        _wait_all([pool.submit(lambda: 1 / 0 if False else (_ for _ in ()).throw(OSError("boom")))], 5, "update")


# ------------------------------------------------------------------------------------------- offload


def test_storage_offload_keeps_views_and_values():
    flat = torch.arange(12.0)
    a, b = flat[:6].view(2, 3), flat[6:]  # views into one storage, like Megatron's grad buffer
    other = torch.ones(3)
    stashes = offload_storages([a, b, flat, other], device_type="cpu", pin_memory=False)
    assert len(stashes) == 2 and flat.untyped_storage().nbytes() == 0
    onload_storages(stashes)
    assert torch.equal(flat, torch.arange(12.0)) and torch.equal(a, flat[:6].view(2, 3)) and torch.equal(other,
                                                                                                       torch.ones(3))
    a += 1  # still a view of flat
    assert flat[0] == 1.0
    kept = offload_storages([flat], "cpu", False, exclude={other.untyped_storage()._cdata})
    assert len(kept) == 1
    onload_storages(kept)


def test_tensors_of_module_and_optimizer():
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    ts = list(tensors_of([m, opt]))
    assert any(t is m.weight.grad for t in ts)
    assert sum(1 for t in ts if t is opt.state[m.weight]["exp_avg"]) == 1
    with pytest.raises(TypeError, match="don't know"):
        list(tensors_of(object()))


class Recorder:
    """Test double: records the engine calls the phase switches make."""

    def __init__(self):
        self.calls = []

    def release_memory(self, tags):
        self.calls.append(("release", tuple(tags)))

    def resume_memory(self, tags):
        self.calls.append(("resume", tuple(tags)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU no-op")
def test_phase_switches_follow_the_staged_order_and_are_no_ops_on_cpu():
    off = Offloader()
    off.register("student", torch.nn.Linear(2, 2))
    off.register("optimizer", torch.nn.Linear(2, 2))
    eng = Recorder()
    stats = to_training(eng, off)
    assert stats.backend == "none" and stats.bytes == 0
    to_rollout(eng, off, lambda: eng.calls.append(("push",)), before_push=("optimizer",), after_push=("student",))
    assert eng.calls == [("release", ("weights", "kv_cache", "cuda_graph")), ("resume", ("weights",)), ("push",),
                         ("resume", ("kv_cache", "cuda_graph"))]
    with pytest.raises(KeyError, match="unknown tags"):
        off.offload("teacher")


class MemoryTransport:
    """Test double: a transport that records memory calls (an SGLang 0.5.23 scheduler dies on resuming a tag it
    never released)."""

    kind, version = "colocated", (0, 5, 23)

    def __init__(self):
        self.calls = []

    def release(self, tags):
        self.calls.append(("release", tuple(tags)))

    def resume(self, tags):
        self.calls.append(("resume", tuple(tags)))

    def flush(self):
        self.calls.append(("flush",))

    def alive(self):
        return True


def test_only_released_memory_is_resumed():
    t = MemoryTransport()
    eng = SGLangEngine(t)
    eng.resume_memory()  # nothing released yet (a fresh or remote engine): nothing sent
    eng.release_memory()
    eng.release_memory(["weights"])  # already released
    eng.resume_memory(["weights"])
    eng.resume_memory(["weights", "kv_cache", "cuda_graph"])
    assert t.calls == [("release", ("weights", "kv_cache", "cuda_graph")), ("resume", ("weights",)),
                       ("resume", ("kv_cache", "cuda_graph"))]
    client = SGLangEngine(MemoryTransport(), receives_weights=False)
    client.release_memory()
    client.resume_memory()
    assert client._t.calls == []  # the process that pushes the weights manages a remote server's memory
