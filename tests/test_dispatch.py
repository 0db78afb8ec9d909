"""Data-parallel generation without a process group: chunks from a shared queue, per-sample seeds (the result does
not depend on the chunking, the concurrency or the number of engines), rewards overlapping generation, the deadline,
and the tensor packing every rank receives."""

from __future__ import annotations

import threading
import time

import pytest

from rlad_megatron.data import PromptSample
from rlad_megatron.rollout.base import SamplingParams
from rlad_megatron.rollout.dispatch import LocalQueue, WorkPlan, flatten, run_engine
from rlad_megatron.rollout.exchange import pack, unpack
from rlad_megatron.rollout.generate import RewardSpec, make_scorer
from rlad_megatron.rollout.simulated import SimulatedEngine

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=64, seed=1000)


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def prompts(n: int) -> list[PromptSample]:
    return [PromptSample(prompt=f"p{i}", answer="", task="t", prompt_ids=[1, 2 + i % 5]) for i in range(n)]


def scorer(name: str = "tests.loop_rewards:length_parity"):
    return make_scorer(RewardSpec(name))


def generate(plan: WorkPlan, engines: int = 1, concurrency: int = 1, **engine_kw):
    """`engines` simulated engines in threads sharing one queue (the threads stand for ranks)."""
    queue, works = LocalQueue(plan.chunks), [None] * engines
    sims = [SimulatedEngine(**engine_kw) for _ in range(engines)]

    def drive(e: int) -> None:
        works[e] = run_engine(sims[e], plan, queue, sampling=SAMPLING, tokenizer=CharTokenizer(), scorer=scorer(),
                              concurrency=concurrency)

    threads = [threading.Thread(target=drive, args=(e,)) for e in range(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return flatten([r for w in works for r in w.results], plan), works


def ids(flat) -> list[list[int]]:
    return [r.output_ids for r in flat[0]]


def test_result_depends_on_nothing_but_the_seed():
    base, _ = generate(WorkPlan(prompts(12), n=4, chunk_groups=12))
    for chunk_groups, engines, concurrency in ((1, 1, 1), (3, 2, 1), (2, 3, 4), (5, 4, 2)):
        got, works = generate(WorkPlan(prompts(12), n=4, chunk_groups=chunk_groups), engines, concurrency)
        assert ids(got) == ids(base) and got[1] == base[1], (chunk_groups, engines, concurrency)
        assert sum(w.sequences for w in works) == 48
    lengths = [len(x) for x in ids(base)]
    assert max(lengths) > 3 * min(lengths), "long-tailed lengths expected from the simulated engine"


def test_prompt_order_and_group_layout():
    plan = WorkPlan(prompts(5), n=3, chunk_groups=2)
    assert plan.chunks == 3 and [s.prompt for s in plan.chunk_samples(2)] == ["p4"]
    (rollouts, rewards), _ = generate(plan, engines=2)
    assert [r.prompt_ids for r in rollouts] == [s.prompt_ids for s in prompts(5) for _ in range(3)]
    assert rewards == [float(sum(map(ord, r.text)) % 2 == 0) for r in rollouts]


class TimedScorer:
    """Adds up how long the reward calls themselves take (the scoring time if nothing overlapped)."""

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from rlad_megatron.rewards import get_reward_fn

        self.fn, self.seconds, self.pool = get_reward_fn(name), 0.0, ThreadPoolExecutor(1)

    def submit(self, response, sample):
        def timed():
            t0 = time.perf_counter()
            out = self.fn(response, sample)
            self.seconds += time.perf_counter() - t0
            return out

        return self.pool.submit(timed)


def test_rewards_overlap_generation():
    """Generation (simulated, ~0.9 s) and scoring (20 ms per sample, ~1 s) take about as long: run one after the
    other they would take their sum; the wall clock must stay within 1.15 x the longer of the two (both measured
    in this run: the engine's busy time and the reward calls' own time)."""
    plan = WorkPlan(prompts(12), n=4, chunk_groups=1)
    engine = SimulatedEngine(seconds_per_token=1e-3, median_tokens=16, sigma=0.5)
    timed = TimedScorer("tests.loop_rewards:slow_parity")
    t0 = time.perf_counter()
    work = run_engine(engine, plan, LocalQueue(plan.chunks), sampling=SAMPLING, tokenizer=CharTokenizer(),
                      scorer=timed)
    wall = time.perf_counter() - t0
    gen, reward = work.busy_seconds, timed.seconds
    assert 0.5 < gen / reward < 2.0, (gen, reward)
    assert wall <= 1.15 * max(gen, reward), f"rollout+reward {wall:.3f} s vs generation {gen:.3f} s, reward {reward:.3f} s"
    assert len(flatten(work.results, plan)[1]) == 48


def test_deadline_stops_taking_chunks():
    plan = WorkPlan(prompts(8), n=2, chunk_groups=1)
    work = run_engine(SimulatedEngine(), plan, LocalQueue(plan.chunks), sampling=SAMPLING, tokenizer=CharTokenizer(),
                      scorer=scorer(), deadline=time.monotonic() - 1.0)
    assert work.results == []
    with pytest.raises(RuntimeError, match="never generated"):
        flatten(work.results, plan)


def test_engine_errors_reach_the_caller():
    class Broken(SimulatedEngine):
        def generate(self, prompts, sampling):
            raise ValueError("engine exploded")

    plan = WorkPlan(prompts(4), n=2)
    with pytest.raises(ValueError, match="engine exploded"):
        run_engine(Broken(), plan, LocalQueue(plan.chunks), sampling=SAMPLING, tokenizer=CharTokenizer(),
                   scorer=scorer(), concurrency=3)


def test_pack_unpack_round_trip():
    plan = WorkPlan(prompts(5), n=3, chunk_groups=2)
    _, works = generate(plan, engines=2)
    results = [r for w in works for r in w.results]
    ints, floats = pack(results)
    back = unpack(ints, floats, plan)
    assert [b.index for b in back] == [r.index for r in results]
    for a, b in zip(results, back, strict=True):
        assert b.rewards == a.rewards
        for x, y in zip(a.rollouts, b.rollouts, strict=True):
            assert (y.prompt_ids, y.output_ids, y.output_logprobs, y.finish_reason) == \
                   (x.prompt_ids, x.output_ids, x.output_logprobs, x.finish_reason)


def test_auto_chunks_one_request_per_static_engine_one_group_per_request_for_sglang():
    """--rollout-chunk-groups 0: a static-batch engine (HF) gets one request per engine and call (a 512-prompt greedy
    eval on one engine is 1 request, not 512); an engine that batches requests in flight (SGLang) one group per
    request; a flag wins."""
    from rlad_megatron.step.generate import chunk_groups

    assert chunk_groups(0, 512, 1, False) == 512 and WorkPlan(prompts(512), n=1, chunk_groups=512).chunks == 1
    assert chunk_groups(0, 8, 2, False) == 4 and chunk_groups(0, 8, 4, False) == 2 and chunk_groups(0, 64, 32, False) == 2
    assert chunk_groups(0, 5, 2, False) == 3 and WorkPlan(prompts(5), n=1, chunk_groups=3).chunks == 2
    assert chunk_groups(0, 512, 8, True) == 1 and chunk_groups(0, 3, 1, True) == 1
    assert chunk_groups(3, 512, 1, False) == 3 and chunk_groups(3, 512, 1, True) == 3