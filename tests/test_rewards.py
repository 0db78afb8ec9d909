"""Reward registry, each built-in reward, format bonus, custom rewards and process-pool scoring."""

from __future__ import annotations

import re
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlad_megatron.data import (
    PromptSample,
    load_prompt_file,
    make_addition_dataset,
    make_task_dataset,
    save_prompt_file,
)
from rlad_megatron.rewards import RewardPool, close_shared_pools, get_reward_fn, score_batch


def tag(text: str) -> str:
    return f"<think>working</think>\n<answer>{text}</answer>"


@pytest.fixture(scope="module")
def kk():
    return make_task_dataset("knights_knaves", size=4, seed=7, n_people=3)


@pytest.fixture(scope="module")
def countdown():
    return make_task_dataset("countdown", size=3, seed=7, min_numbers=3, max_numbers=4, max_value=25)


@pytest.fixture(scope="module")
def chain():
    return make_task_dataset("chain_sum", size=3, seed=7)


def _flip_first_role(sample: PromptSample) -> str:
    """The oracle answer with the first person's role swapped (the puzzle's own role words)."""
    terms = sample.meta["rg_entry"]["metadata"]["knight_knave_terms"]
    swap = {terms["knight"]: terms["knave"], terms["knave"]: terms["knight"]}
    m = re.search("|".join(map(re.escape, swap)), sample.answer)
    assert m, sample.answer
    return sample.answer[: m.start()] + swap[m.group()] + sample.answer[m.end() :]


def test_knights_knaves_reward(kk):
    r = get_reward_fn("knights_knaves")
    for s in kk:
        assert r(tag(s.answer), s) == 1.0
        assert r(s.answer, s) == 0.0  # malformed: no answer tag
        assert r(tag(""), s) == 0.0
        wrong = _flip_first_role(s)
        assert r(tag(wrong), s) == 0.0  # reasoning-gym would give partial credit; binary gives 0
        partial_score = get_reward_fn("knights_knaves", partial_credit=True)(tag(wrong), s)
        assert partial_score == pytest.approx(0.3 + 0.7 * 2 / 3)  # reasoning-gym's raw score: 2 of 3 right


def test_task_reward_rejects_other_tasks(kk, chain):
    with pytest.raises(ValueError, match="reward 'knights_knaves' got a sample of task 'chain_sum'"):
        get_reward_fn("knights_knaves")(tag("1"), chain[0])


def test_countdown_and_chain_sum(countdown, chain):
    r = get_reward_fn("countdown")
    for s in countdown:
        nums = s.meta["rg_entry"]["metadata"]["numbers"]
        assert r(tag(s.answer), s) == 1.0
        assert r(tag("+".join(map(str, nums))), s) == float(sum(nums) == s.meta["rg_entry"]["metadata"]["target"])
        assert r(tag(f"{s.answer} + 0"), s) == 0.0  # uses a number not given (reasoning-gym: 0.05)
        assert r("no tags", s) == 0.0  # reasoning-gym: 0.01
    c = get_reward_fn("chain_sum")
    for s in chain:
        assert c(tag(s.answer), s) == 1.0
        assert c(tag(s.answer + "0"), s) == 0.0  # reasoning-gym gives substring credit here


def test_generic_reasoning_gym_routes_by_sample(kk, countdown, chain):
    samples = [kk[0], countdown[0], chain[0]]
    r = get_reward_fn("reasoning_gym")
    assert [r(tag(s.answer), s) for s in samples] == [1.0, 1.0, 1.0]
    assert [r(tag(samples[(i + 1) % 3].answer), s) for i, s in enumerate(samples)] == [0.0, 0.0, 0.0]


def test_reasoning_gym_reward_on_file_loaded_samples(tmp_path, kk, countdown):
    save_prompt_file([*kk, *countdown], tmp_path / "rg.jsonl")
    loaded = load_prompt_file(tmp_path / "rg.jsonl")
    r = get_reward_fn("reasoning_gym")
    assert [r(tag(s.answer), s) for s in loaded] == [1.0] * len(loaded)
    minimal = PromptSample(prompt="puzzle", answer=kk[0].answer, task="knights_knaves")  # no rg_entry
    assert get_reward_fn("knights_knaves")(tag(kk[0].answer), minimal) == 1.0
    assert get_reward_fn("knights_knaves")(tag(_flip_first_role(kk[0])), minimal) == 0.0


MATH = PromptSample(prompt="What is 1/2 as a decimal?", answer="0.5", task="math")


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"so the answer is \boxed{1/2}.", 1.0),
        (r"$\boxed{\frac{1}{2}}$", 1.0),
        (r"first \boxed{3}, no wait: \boxed{0.5}", 1.0),  # the last box counts
        (r"\boxed{0.6}", 0.0),
        (r"\boxed{0.5} hmm, actually \boxed{3}", 0.0),
        ("0.5", 0.0),  # unboxed
        ("The final answer is $0.5$", 0.0),  # anchored but unboxed: still rejected
        (r"\boxed{1/2", 0.0),  # unbalanced
        (r"\boxed{}", 0.0),
    ],
)
def test_math_reward_boxed_only(response, expected):
    assert get_reward_fn("math")(response, MATH) == expected


def test_math_gold_forms_and_threads():
    r = get_reward_fn("math")
    assert r(r"\boxed{0.5}", PromptSample("q", r"\frac{1}{2}")) == 1.0
    assert r(r"\boxed{(1,2)}", PromptSample("q", "(1,2)")) == 1.0
    assert r(r"\boxed{[1,2]}", PromptSample("q", "(1,2)")) == 0.0
    with ThreadPoolExecutor(2) as ex:  # off the main thread the signal timeout must be disabled
        assert list(ex.map(lambda resp: r(resp, MATH), [r"\boxed{1/2}", r"\boxed{2}"])) == [1.0, 0.0]
    with pytest.raises(ValueError, match="cannot parse gold"):
        r(r"\boxed{1}", PromptSample("q", ""))


def test_addition_reward():
    [s] = make_addition_dataset("train", 1, seed=3)
    r = get_reward_fn("addition")
    trace = s.meta["target"]
    head, _, ans = trace.rpartition("A")
    assert r(trace, s) == 1.0 and r(trace + "<eos>", s) == 1.0 and r(trace + "\n", s) == 1.0
    assert r(f"{head}A{int(ans) + 1}", s) == 0.0
    assert r(f"{head}A0{ans}", s) == 0.0  # exact: no leading zeros
    assert r(trace + ";1", s) == 0.0  # run-on after the answer
    assert r(f"{head}A{ans}A", s) == 0.0  # answer must follow the final A
    assert r("", s) == 0.0 and r("A", s) == 0.0
    assert r(f"A{ans}", s) == 1.0  # the reward checks the answer, not the trace


def test_format_reward_bonus(kk):
    s = kk[0]
    r = get_reward_fn("knights_knaves", format_reward=0.1)
    assert r(tag(s.answer), s) == pytest.approx(1.1)
    assert r(tag("nobody"), s) == pytest.approx(0.1)
    assert r(s.answer, s) == 0.0
    m = get_reward_fn("math", format_reward=0.2)
    assert (m(r"\boxed{0.5}", MATH), m(r"\boxed{7}", MATH), m("0.5", MATH)) == pytest.approx((1.2, 0.2, 0.0))
    [a] = make_addition_dataset("eval", 1, seed=0)
    ad = get_reward_fn("addition", format_reward=0.1)
    head, _, ans = a.meta["target"].rpartition("A")
    assert ad(a.meta["target"], a) == pytest.approx(1.1)
    assert ad(f"{head}A{int(ans) + 1}", a) == pytest.approx(0.1)
    assert ad(f"A{ans}", a) == pytest.approx(1.0)  # correct but without the trace: no bonus
    with pytest.raises(ValueError, match=">= 0"):
        get_reward_fn("math", format_reward=-1.0)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward_fn("rlad_megatron.rewards.addition:missing")
    with pytest.raises(ValueError, match="package.module:function"):
        get_reward_fn("rlad_megatron.rewards.addition:")
    with pytest.raises(ValueError, match="no partial credit"):
        get_reward_fn("math", partial_credit=True)
    with pytest.raises(ValueError, match="2 responses but 1 samples"):
        score_batch("math", ["a", "b"], [MATH])


CUSTOM = """
def length_reward(response, sample):
    return float(len(response) == len(sample.answer))

def starts_ok(response, sample):
    return response.startswith("ok")

def tagged_reward(response, sample):
    return float(response.endswith(sample.answer))

tagged_reward.format_fn = starts_ok
"""


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "rlad_test_custom_reward.py").write_text(textwrap.dedent(CUSTOM))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rlad_test_custom_reward"


def test_custom_reward(custom_module):
    s = PromptSample("q", "abc")
    assert get_reward_fn(f"{custom_module}:length_reward")("xyz", s) == 1.0
    assert get_reward_fn(f"{custom_module}:length_reward")("xy", s) == 0.0
    with pytest.raises(ValueError, match="no format check"):
        get_reward_fn(f"{custom_module}:length_reward", format_reward=0.1)
    f = get_reward_fn(f"{custom_module}:tagged_reward", format_reward=0.5)
    assert (f("ok abc", s), f("ok", s), f("abc", s)) == (1.5, 0.5, 1.0)


def test_process_pool_equals_inline(custom_module, kk, countdown, chain):
    rg_samples = [*kk, *countdown, *chain]
    rg_responses = []
    for i, s in enumerate(rg_samples):  # correct, wrong, malformed in turn
        rg_responses.append([tag(s.answer), tag("0"), s.answer][i % 3])
    add = make_addition_dataset("eval", 6, seed=2)
    add_responses = [s.meta["target"] if i % 2 else s.meta["target"] + "9" for i, s in enumerate(add)]
    math_samples, math_responses = [MATH] * 4, [r"\boxed{1/2}", r"\boxed{2}", "0.5", r"\boxed{\frac{2}{4}}"]
    custom = [PromptSample("q", "abc")] * 3
    custom_responses = ["ok abc", "ok", "abc"]
    cases = [
        ("reasoning_gym", rg_responses, rg_samples, 0.1),
        ("addition", add_responses, add, 0.0),
        ("math", math_responses, math_samples, 0.0),
        (f"{custom_module}:tagged_reward", custom_responses, custom, 0.5),
    ]
    with RewardPool(2) as pool:  # started after the custom module's path was added
        for name, responses, samples, fr in cases:
            inline = score_batch(name, responses, samples, format_reward=fr)
            assert pool.score(name, responses, samples, format_reward=fr) == inline
            assert len(set(inline)) > 1  # the batch mixes rewards, so the order is checked too
    try:
        responses, samples = cases[0][1], cases[0][2]
        assert score_batch("reasoning_gym", responses, samples, num_workers=1) == score_batch(
            "reasoning_gym", responses, samples
        )
    finally:
        close_shared_pools()
