"""Bounded rewards: linear answer extraction on 100 KB degenerate responses, per-sample deadlines (inline thread
and worker processes) that score 0 and are counted, and futures that resolve to their own sample's score."""

from __future__ import annotations

import time

import pytest

from rlad_megatron.data import PromptSample, make_addition_dataset, make_task_dataset
from rlad_megatron.rewards import RewardPool, RewardScorer, get_reward_fn, score_batch
from rlad_megatron.rewards.math import last_boxed
from rlad_megatron.rewards.reasoning_gym import MAX_ANSWER_CHARS, extract_tagged_answer
from rlad_megatron.rewards.registry import warm_up

N = 100_000
MATH = PromptSample("q", "0.5", task="math")
HANG = "tests.hang_rewards:misbehave"

# degenerate responses an RL policy produces at max length; each is ~100 KB
ADVERSARIAL = {
    "unclosed answer tags": "<answer>" * (N // 8),
    "unclosed answer tags with text": "<answer>x " * (N // 10),
    "nested open/close runs": "<answer>" * (N // 17) + "</answer>" * (N // 18),
    "long answer": "<answer>" + "1+" * (N // 2) + "</answer>",
    "unclosed boxes": "\\boxed{" * (N // 7),
    "unbalanced braces": "\\boxed{" + "{" * N,
    "whitespace run": " " * N + "x",
    "eos run": "<eos>" * (N // 5) + "x",
    "plus run": "1+" * (N // 2),
    "trace loop": "1+1=2;" * (N // 6) + "x",
    "digits after A": "A" + "1" * N + "x",
}


@pytest.fixture(scope="module")
def samples() -> dict[str, PromptSample]:
    return {
        "knights_knaves": make_task_dataset("knights_knaves", size=1, seed=7, n_people=3)[0],
        "countdown": make_task_dataset("countdown", size=1, seed=7, min_numbers=3, max_numbers=4, max_value=25)[0],
        "chain_sum": make_task_dataset("chain_sum", size=1, seed=7)[0],
        "math": MATH,
        "addition": make_addition_dataset("eval", 1, seed=0)[0],
    }


def test_extraction_matches_reasoning_gym_on_ordinary_responses():
    from reasoning_gym.utils import extract_answer

    cases = ["<answer>42</answer>", "<think>x</think>\n<answer> Zoey is a knight </answer>", "no tags",
             "<answer>1</answer> then <answer>2</answer>", "<answer>1</answer> <answer>unclosed",
             "<answer>\n3 + 4\n</answer>\n", "</answer><answer>5</answer>", "<answer></answer>"]
    for text in cases:
        assert extract_tagged_answer(text) == extract_answer(text, tag_name="answer"), text
    assert extract_tagged_answer("<answer>a <answer>b</answer>") == "b"  # documented difference: innermost pair
    assert extract_tagged_answer("<answer>" + "x" * (MAX_ANSWER_CHARS + 1) + "</answer>") is None
    assert last_boxed(r"\boxed{\frac{1}{2}} and \fbox {3}") == "3"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None
    assert last_boxed("\\boxed{" + "1" * 2000 + "}") is None


@pytest.mark.parametrize("reward", ["knights_knaves", "countdown", "chain_sum", "reasoning_gym", "math", "addition"])
def test_adversarial_responses_score_fast(reward, samples):
    sample = samples["knights_knaves" if reward == "reasoning_gym" else reward]
    fn = get_reward_fn(reward, format_reward=0.1)
    warm_up(reward)  # imports and math-verify's grammar: not part of any response's time
    fn("warm-up: scorer construction", sample)
    slow = {}
    for name, text in ADVERSARIAL.items():
        assert len(text) >= 0.9 * N
        best = min(_timed(fn, text, sample) for _ in range(2))  # best of two: other jobs share these cores
        if best >= 0.1:
            slow[name] = round(best, 3)
        assert fn(text, sample) == 0.0, name  # none of them is a well-formed correct answer
    assert not slow, f"{reward}: seconds per call {slow}"
    # a correct answer after 100 KB of junk still counts (the search is from the end); the addition format bonus
    # needs the whole response to be the trace
    good = {"math": r"\boxed{1/2}", "addition": sample.meta.get("target", "")}.get(reward, f"<answer>{sample.answer}"
                                                                                          "</answer>")
    assert fn("<answer>" * (N // 8) + good, sample) == pytest.approx(1.0 if reward == "addition" else 1.1)


def _timed(fn, text, sample) -> float:
    t = time.perf_counter()
    fn(text, sample)
    return time.perf_counter() - t


def _hang(answer: int, **how) -> PromptSample:
    return PromptSample("q", str(answer), meta=how)


def test_inline_deadline_scores_zero_and_counts():
    scorer = RewardScorer(HANG, workers=0, timeout=0.5)
    batch = [_hang(1), _hang(2, sleep=30), _hang(3), _hang(4, busy=2.0), _hang(5)]
    t = time.monotonic()
    assert scorer.score_batch(["r"] * len(batch), batch) == [1.0, 0.0, 3.0, 0.0, 5.0]
    assert time.monotonic() - t < 5.0  # two deadlines of 0.5 s, not 32 s
    assert scorer.timeouts == 2 and scorer.pop_timeouts() == 2 and scorer.pop_timeouts() == 0
    assert scorer.score_batch(["r"], [_hang(7)]) == [7.0]  # a fresh thread took over the queue


def test_no_timeout_scores_in_the_caller():
    scorer = RewardScorer(HANG, workers=0, timeout=0)
    fut = scorer.submit("r", _hang(9))
    assert fut.done() and fut.result() == 9.0
    with pytest.raises(ValueError, match="float"):
        scorer.submit("r", PromptSample("q", "not a number")).result()
    assert score_batch(HANG, ["r", "r"], [_hang(1), _hang(2)]) == [1.0, 2.0]


def test_worker_deadline_kills_hung_workers_and_futures_keep_their_order():
    with RewardPool(2) as pool:
        scorer = RewardScorer(HANG, workers=2, timeout=1.0, pool=pool)
        assert scorer.score_batch(["r"], [_hang(0)]) == [0.0]  # workers started and the reward resolved
        batch = [_hang(1, sleep=30), _hang(2, regex=64), _hang(3), _hang(4, busy=30), _hang(5), _hang(6)]
        t = time.monotonic()
        futures = [scorer.submit("r", s) for s in batch]
        assert [f.result(timeout=60) for f in futures] == [0.0, 0.0, 3.0, 0.0, 5.0, 6.0]
        assert time.monotonic() - t < 30.0  # three 1 s deadlines plus replacement workers' start-up
        assert scorer.timeouts == 3 and pool.killed == 3

        # futures resolve to their own sample's score, in completion order, not submission order
        assert pool.wait_ready(timeout=60)  # both replacement workers are up
        done: list[int] = []
        delays = [0.6, 0.0, 0.3, 0.0]
        futures = [scorer.submit("r", _hang(i, sleep=d)) for i, d in enumerate(delays)]
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _, i=i: done.append(i))
        assert [f.result(timeout=30) for f in futures] == [0.0, 1.0, 2.0, 3.0]
        assert done[0] in (1, 3) and done.index(1) < done.index(0)
        assert scorer.timeouts == 3  # nothing new timed out

        with pytest.raises(ValueError, match="float"):  # reward errors reach the caller through the future
            scorer.submit("r", PromptSample("q", "x")).result(timeout=30)
