"""SGLangEngine against real SGLang: the HF engine's contract (log-prob parity with an HF forward, greedy, prefill
scoring, bucketed weight updates then parity with the new weights, sessions), plus the remote path (HTTP server,
distributed update over gloo/NCCL, a refused update that errors instead of hanging, restart-once).

Runs wherever `import sglang` works: the CPU lane (docs/sglang_cpu_lane.md) or a GPU box. fp32 tiny Qwen2 models.
"""

from __future__ import annotations

import time

import pytest
import torch

# a submodule: under pytest the bare tests/sglang/ folder imports as an empty namespace package "sglang"
pytest.importorskip("sglang.srt.server_args", reason="sglang is not installed: see docs/sglang_cpu_lane.md (CPU lane) "
                                                     "or pip install -e .[gpu]")
import sglang
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlad_megatron.rollout.base import RolloutEngine, SamplingParams, WeightUpdateError
from rlad_megatron.rollout.sglang.args import parse_version
from rlad_megatron.rollout.sglang.engine import (
    LogprobParityError,
    ServerProcess,
    SGLangEngine,
    check_logprob_parity,
    tail_logprobs,
)
from rlad_megatron.rollout.sglang.remote import SESSION_MIN_VERSION
from rlad_megatron.rollout.weight_sync import push_weights

torch.set_num_threads(1)
VOCAB = 512
TOL = 2e-3  # fp32 engine vs fp32 HF forward (measured 1.5e-4 .. 9e-4 on CPU)
SESSIONS = parse_version(sglang.__version__) >= SESSION_MIN_VERSION
SERVER_KW = {"dtype": "float32", "random_seed": 0, "skip_tokenizer_init": True}
if not torch.cuda.is_available():
    SERVER_KW.update(device="cpu", attention_backend="torch_native", max_total_tokens=8192)
else:
    SERVER_KW.update(mem_fraction_static=0.3)


def random_model(seed: int) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).float().eval()


def make_prompts(n: int, seed: int, lo: int = 3, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens]


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], output: list[int], temperature: float = 1.0) -> torch.Tensor:
    logits = model(torch.tensor([prompt + output])).logits[0].float()
    return tail_logprobs(logits, torch.tensor(prompt + output), len(output), temperature)


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_models")
    a, b = random_model(1), random_model(2)
    a.save_pretrained(root / "a")
    return {"dir_a": root / "a", "a": a, "b": b}


@pytest.fixture(scope="module")
def engine(models):
    eng = SGLangEngine.colocated(models["dir_a"], server_kwargs=dict(SERVER_KW))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def remote(models, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang_server") / "server.log"
    server = ServerProcess({"model_path": str(models["dir_a"]), **SERVER_KW}, log_path=log_path)
    eng = SGLangEngine.remote([server.url], servers=[server], update_timeout_s=60, model_path=models["dir_a"])
    yield eng
    eng.shutdown()


def named_weights(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, t.detach().clone()) for n, t in model.state_dict().items()]


def assert_follows(engine, model, temperature: float = 1.0, seed: int = 3) -> float:
    prompts = make_prompts(6, seed=seed)
    sp = SamplingParams(temperature=temperature, max_new_tokens=10, ignore_eos=True, seed=5)
    outs = engine.generate(prompts, sp)
    worst = 0.0
    for p, o in zip(prompts, outs):
        assert o.prompt_ids == p and len(o.output_ids) == len(o.output_logprobs) == 10
        assert o.finish_reason == "length" and o.weight_version == engine.weight_version
        worst = max(worst, max_diff(o.output_logprobs, hf_logprobs(model, p, o.output_ids, temperature)))
    assert worst < TOL, worst
    return worst


# ---------------------------------------------------------------------------------------------- colocated


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.mode == "colocated" and engine.weight_version == "default" and engine.health()
    assert engine.update_dtype is None  # fp32 engine: push_weights sends as is


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (0.8, 20, 0.9)])
def test_generate_logprobs_match_hf(engine, models, temperature, top_k, top_p):
    prompts = make_prompts(8, seed=3)
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, ignore_eos=True)
    outs = engine.generate(prompts, sp)
    worst = max(max_diff(o.output_logprobs, hf_logprobs(models["a"], p, o.output_ids, temperature))
                for p, o in zip(prompts, outs))
    print(f"\n[sglang colocated] T={temperature} top_k={top_k} top_p={top_p}: max |logp - HF| = {worst:.2e}")
    assert worst < TOL
    assert all(o.meta["completion_tokens"] == 12 for o in outs)


def test_greedy_is_argmax_with_raw_logprobs(engine, models):
    prompts = make_prompts(4, seed=4)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            logits = models["a"](torch.tensor([p + o.output_ids])).logits[0, len(p) - 1:-1]
        assert o.output_ids == logits.argmax(-1).tolist()
        assert max_diff(o.output_logprobs, hf_logprobs(models["a"], p, o.output_ids, 1.0)) < TOL


def test_stop_token_is_kept_with_its_logprob(engine, models):
    prompts = make_prompts(3, seed=5)
    base = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    stop = base[0].output_ids[2]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True,
                                                   stop_token_ids=(stop,)))
    o = outs[0]
    assert o.finish_reason == "stop" and o.output_ids[-1] == stop and len(o.output_ids) == len(o.output_logprobs)
    assert o.output_ids == base[0].output_ids[: o.output_ids.index(stop) + 1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_matches_hf(engine, models, temperature):
    seqs = make_prompts(5, seed=6, lo=6, hi=20)
    lens = [max(1, len(s) // 2) for s in seqs]
    got = engine.score(seqs, lens, temperature=temperature)
    for s, p, g in zip(seqs, lens, got):
        assert len(g) == len(s) - p
        assert max_diff(g, hf_logprobs(models["a"], s[:p], s[p:], temperature)) < TOL
    assert engine.score([seqs[0]], [len(seqs[0])]) == [[]]


def test_update_outside_session_raises_and_engine_refuses_too(engine, models):
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        engine.update_weights(named_weights(models["b"])[:2])
    if SESSIONS:  # the engine itself refuses a load outside a session (SGLang >= 0.5.21)
        with pytest.raises(WeightUpdateError, match="begin_weight_update"):
            engine._t.load_bucket(named_weights(models["b"])[:2])
    assert engine.health() and engine.weight_version == "default"


def test_bucketed_update_then_parity_with_new_weights(engine, models):
    t0 = time.perf_counter()
    stats = push_weights(engine, named_weights(models["b"]), version="v1", bucket_bytes=256 * 1024)
    assert stats.buckets > 1 and engine.weight_version == "v1"
    worst = assert_follows(engine, models["b"])
    probes = make_prompts(3, seed=7, lo=8, hi=16)
    refs = [hf_logprobs(models["b"], s[:1], s[1:]) for s in probes]
    diff = check_logprob_parity(engine, probes, refs, atol=TOL)
    print(f"\n[sglang colocated] bucketed sync: {stats.buckets} buckets, {stats.bytes / 2**20:.2f} MiB in "
          f"{stats.seconds:.2f} s ({time.perf_counter() - t0:.2f} s total); generate parity {worst:.2e}, "
          f"probe parity {diff:.2e}")
    with pytest.raises(LogprobParityError):  # the old weights' log-probs are far off the new ones
        check_logprob_parity(engine, probes, [hf_logprobs(models["a"], s[:1], s[1:]) for s in probes], atol=TOL)
    push_weights(engine, named_weights(models["a"]), version="v2")
    assert_follows(engine, models["a"])


def test_memory_calls_follow_the_staged_order(engine, models):
    from rlad_megatron.offload import Offloader, to_rollout, to_training

    off = Offloader()
    to_training(engine, off)
    to_rollout(engine, off, lambda: push_weights(engine, named_weights(models["b"]), version="v3"))
    assert engine.weight_version == "v3"
    assert_follows(engine, models["b"])


def test_concurrent_generate_calls_batch_together(engine, models):
    """Dispatch worker threads share one colocated engine: 8 one-prompt calls at once are batched by the scheduler
    (in flight together through the engine's loop), match HF, and take far less than 8 calls one after another."""
    import threading

    push_weights(engine, named_weights(models["a"]), version="conc")
    prompts = make_prompts(8, seed=11)
    sp = SamplingParams(temperature=1.0, max_new_tokens=48, ignore_eos=True)
    engine.generate(prompts[:1], sp)  # warm-up
    t0 = time.perf_counter()
    for p in prompts:
        engine.generate([p], sp)
    sequential = time.perf_counter() - t0
    outs: dict = {}
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, engine.generate([prompts[i]], sp)[0]))
               for i in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = time.perf_counter() - t0
    worst = max(max_diff(outs[i].output_logprobs, hf_logprobs(models["a"], prompts[i], outs[i].output_ids))
                for i in range(8))
    print(f"\n[sglang colocated] 8 x 48 tokens: one at a time {sequential:.2f} s, 8 threads {concurrent:.2f} s "
          f"(peak in flight {engine._t.pump.peak_inflight}); max |logp - HF| = {worst:.2e}")
    assert worst < TOL and engine._t.pump.peak_inflight == 8
    assert concurrent < 0.6 * sequential, (concurrent, sequential)


# ----------------------------------------------------------------------------------------------- remote


def test_remote_generate_and_score_match_hf(remote, models):
    assert remote.mode == "remote" and remote.health()
    assert_follows(remote, models["a"], temperature=0.7)
    seqs = make_prompts(3, seed=8, lo=6, hi=14)
    got = remote.score(seqs, [2] * 3)
    assert max(max_diff(g, hf_logprobs(models["a"], s[:2], s[2:])) for s, g in zip(seqs, got)) < TOL


def test_remote_distributed_update_then_parity(remote, models):
    stats = push_weights(remote, named_weights(models["b"]), version="r1", bucket_bytes=256 * 1024)
    worst = assert_follows(remote, models["b"])
    print(f"\n[sglang remote, {remote._t.sync_backend}] distributed sync: {stats.buckets} buckets, "
          f"{stats.bytes / 2**20:.2f} MiB in {stats.seconds:.2f} s; parity {worst:.2e}")
    assert remote.weight_version == "r1"


@pytest.mark.skipif(not SESSIONS, reason="SGLang < 0.5.21 has no server-side weight-update sessions")
def test_remote_update_without_session_errors_and_does_not_hang(remote, models):
    t0 = time.perf_counter()
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        remote._t.load_bucket(named_weights(models["a"])[:3])  # bypass the client-side check
    assert time.perf_counter() - t0 < 30
    push_weights(remote, named_weights(models["a"]), version="r2")  # a fresh group; the engine is fine
    assert_follows(remote, models["a"])


def test_remote_group_without_sglang_helper(remote, models, monkeypatch):
    """The trainer-side group built by plain torch (no sglang on the trainer) matches SGLang's engine side."""
    import functools

    from rlad_megatron.rollout.sglang import remote as sglang_remote

    monkeypatch.setattr(sglang_remote, "init_weight_group",
                        functools.partial(sglang_remote.init_weight_group, prefer_sglang=False))
    remote._t._group = None
    push_weights(remote, named_weights(models["a"]), version="r4", bucket_bytes=128 * 1024)
    assert_follows(remote, models["a"])


def test_remote_restart_once_then_clear_error(remote, models):
    """Runs last: it kills the server twice (the second death is final)."""
    server = remote._t.servers[0]
    server.proc.kill()
    server.proc.wait()
    with pytest.raises(RuntimeError, match="push the weights again"):
        remote.generate(make_prompts(1, seed=9), SamplingParams(max_new_tokens=2))
    assert remote.restarts == 1 and remote.health() and remote.weight_version == "default"
    push_weights(remote, named_weights(models["b"]), version="r3")
    assert_follows(remote, models["b"])
    server.proc.kill()
    server.proc.wait()
    with pytest.raises(RuntimeError, match="giving up"):
        remote.generate(make_prompts(1, seed=9), SamplingParams(max_new_tokens=2))
