"""Prompt files, encoding, reasoning-gym task sets, the addition task and the char tokenizer."""

from __future__ import annotations

import json
import pickle
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlad_megatron.data import (
    EVAL_SEED_OFFSET,
    PromptSample,
    addition_prompt,
    addition_trace,
    build_char_tokenizer,
    encode_prompt,
    encode_samples,
    load_prompt_file,
    make_addition_dataset,
    make_task_dataset,
    save_prompt_file,
)
from rlad_megatron.data.addition import TRACE_RE
from rlad_megatron.data.char_tokenizer import VOCAB
from rlad_megatron.data.partition import BUCKETS, HELD_OUT, SALT, bucket, draw_split, split_of, split_share
from rlad_megatron.data.tasks import generate_entries
from rlad_megatron.errors import UserError

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _write_jsonl(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def char_tok():
    return build_char_tokenizer()


# ---------------------------------------------------------------- prompt files


def test_load_jsonl_prompt_and_messages(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "What is 1+1?", "answer": "2", "task": "math", "source": "hand"},
        {"messages": MSGS, "answer": 4},
        {"prompt": MSGS, "answer": "4"},  # verl-style: chat messages under the prompt key
    ]
    _write_jsonl(path, [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2])])
    s = load_prompt_file(path, default_task="gsm")
    assert len(s) == 3
    assert s[0] == PromptSample(prompt="What is 1+1?", answer="2", task="math", meta={"source": "hand"})
    assert s[1].prompt == MSGS and s[1].is_chat and s[1].answer == "4" and s[1].task == "gsm"
    assert s[2].prompt == MSGS and s[2].meta == {}


def test_load_parquet_mixed_and_nested_keys(tmp_path):
    path = tmp_path / "prompts.parquet"
    table = pa.table(
        {
            "question": ["What is 1+1?", None],
            "messages": [None, MSGS],
            "reward_model": [{"ground_truth": "2"}, {"ground_truth": "4"}],
            "level": [1, 2],
        }
    )
    pq.write_table(table, path)
    s = load_prompt_file(path, prompt_key="question", answer_key="reward_model.ground_truth")
    assert [x.prompt for x in s] == ["What is 1+1?", MSGS]
    assert [x.answer for x in s] == ["2", "4"]
    assert [x.meta["level"] for x in s] == [1, 2]


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [
        ('{"prompt": "q"}', r"prompts\.jsonl:3: field 'answer' missing"),
        ('{"prompt": "q", "answer": "1"', r"prompts\.jsonl:3: invalid JSON"),
        ('{"prompt": "q", "answer": ["1"]}', r"prompts\.jsonl:3: field 'answer' must be a string or number, got list"),
        (
            '{"prompt": 5, "answer": "1"}',
            r"prompts\.jsonl:3: field 'prompt' must be a string or chat messages, got int",
        ),
        ('{"messages": [{"role": "user"}], "answer": "1"}', r"prompts\.jsonl:3: field 'messages'\[0\] must be a dict"),
        ('{"messages": "hi", "answer": "1"}', r"prompts\.jsonl:3: field 'messages' must be a non-empty list"),
        ('{"prompt": "q", "messages": [], "answer": "1"}', r"prompts\.jsonl:3: both 'prompt' and 'messages'"),
        ('{"answer": "1"}', r"prompts\.jsonl:3: field 'prompt' \(string\) or 'messages'"),
        ('{"prompt": "q", "answer": "1", "task": 3}', r"prompts\.jsonl:3: field 'task' must be a string"),
        ("[1, 2]", r"prompts\.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_jsonl_bad_rows_name_file_line_and_field(tmp_path, bad_line, pattern):
    path = tmp_path / "prompts.jsonl"
    _write_jsonl(path, ['{"prompt": "ok", "answer": "1"}', "", bad_line])
    with pytest.raises(ValueError, match=pattern):
        load_prompt_file(path)


def test_parquet_bad_row_names_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", None]}), path)
    with pytest.raises(ValueError, match=r"p\.parquet:row 1: field 'answer' missing"):
        load_prompt_file(path)


def test_unsupported_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        load_prompt_file(tmp_path / "x.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(tmp_path / "e.jsonl")


def test_save_load_roundtrip(tmp_path):
    samples = [PromptSample("p", "1", "t", {"k": [1, 2]}), PromptSample(MSGS, "4", "u", {})]
    save_prompt_file(samples, tmp_path / "s.jsonl")
    assert load_prompt_file(tmp_path / "s.jsonl") == samples


# ---------------------------------------------------------------- encoding


def test_encode_prompt_uses_chat_template(char_tok):
    tok = build_char_tokenizer()
    tok.chat_template = TEMPLATE
    ids = encode_prompt(PromptSample(MSGS, "4"), tok)
    assert tok.decode(ids) == "[system]Be brief.\n[user]2+2?\n[assistant]"
    plain = encode_prompt(PromptSample("hi", "x"), tok)  # string prompt -> one user message
    assert tok.decode(plain) == "[user]hi\n[assistant]"
    assert encode_prompt(PromptSample("hi", "x"), tok, apply_chat_template=False) == char_tok("hi")["input_ids"]
    with pytest.raises(ValueError, match="apply_chat_template=False"):
        encode_prompt(PromptSample(MSGS, "4"), tok, apply_chat_template=False)


def test_encode_prompt_raw_without_template(char_tok):
    assert not char_tok.chat_template
    ids = encode_prompt(PromptSample("Q0001+0002:", "3"), char_tok)
    assert ids == [VOCAB[c] for c in "Q0001+0002:"]
    with pytest.raises(ValueError, match="no chat_template"):
        encode_prompt(PromptSample(MSGS, "4"), char_tok)
    [enc] = encode_samples([PromptSample("Q1:", "1")], char_tok)
    assert enc.prompt_ids == [VOCAB["Q"], VOCAB["1"], VOCAB[":"]]


# ---------------------------------------------------------------- char tokenizer


def test_char_tokenizer_roundtrip_offline(tmp_path, monkeypatch, char_tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(char_tok, PreTrainedTokenizerFast)
    assert len(char_tok) == len(VOCAB) < 128
    assert (char_tok.pad_token_id, char_tok.eos_token_id) == (0, 1)
    text = "Q0814+0707+0965:4+7+5+0=16;A2486 <answer>Lily is a knight, and Bob</answer>\n  (x/y)?!"
    ids = char_tok(text)["input_ids"]
    assert len(ids) == len(text) and char_tok.unk_token_id not in ids  # one token per char, all known
    assert char_tok.decode(ids) == text
    char_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert loaded.decode([*ids, loaded.eos_token_id, loaded.pad_token_id], skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)


# ---------------------------------------------------------------- reasoning-gym task sets


def test_task_dataset_seeded_and_prompts_ask_for_answer_tags():
    a = make_task_dataset("knights_knaves", size=4, seed=3, n_people=3)
    b = make_task_dataset("knights_knaves", size=4, seed=3, n_people=3)
    c = make_task_dataset("knights_knaves", size=4, seed=4, n_people=3)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]
    s = a[0]
    assert s.task == "knights_knaves" and s.prompt[0]["role"] == "system" and "<answer>" in s.prompt[0]["content"]
    assert s.prompt[1] == {"role": "user", "content": s.meta["rg_entry"]["question"]}
    assert s.answer == s.meta["rg_entry"]["answer"] and s.meta["rg_config"] == {"n_people": 3}
    assert pickle.loads(pickle.dumps(a)) == a
    names = s.meta["rg_entry"]["metadata"]["names"]
    assert all(type(n) is str for n in names)  # numpy scalars made plain
    flat = make_task_dataset("chain_sum", size=2, seed=0, chat=False)
    assert isinstance(flat[0].prompt, str) and "<answer>" in flat[0].prompt
    assert flat[0].prompt.endswith(flat[0].meta["rg_entry"]["question"])
    bare = make_task_dataset("basic_arithmetic", size=1, seed=0, system_prompt=None)
    assert [m["role"] for m in bare[0].prompt] == ["user"]


def test_train_eval_disjoint_where_naive_seeds_overlap():
    train = generate_entries("knights_knaves", split="train", size=20, seed=11, n_people=3)
    naive_eval = generate_entries("knights_knaves", split="train", size=20, seed=12, n_people=3)
    assert naive_eval[0]["question"] == train[1]["question"]  # reasoning-gym item i uses seed S + i
    evals = make_task_dataset("knights_knaves", split="eval", size=20, seed=11, n_people=3)
    assert {e["question"] for e in train}.isdisjoint(s.meta["rg_entry"]["question"] for s in evals)
    # the eval split draws from seed + 10**9 and keeps the items of its hash bucket (data.partition), in order
    shifted = generate_entries("knights_knaves", split="train", size=2000, seed=11 + EVAL_SEED_OFFSET, n_people=3)
    in_eval = [e["question"] for e in shifted if split_of(e["question"]) == "eval"]
    assert in_eval[:20] == [s.meta["rg_entry"]["question"] for s in evals]


def test_partition_disjoint_by_construction_in_a_small_item_space():
    """1-digit sums of two terms: 100 distinct prompts. Seeds and sizes cannot make a held-out set overlap training."""
    cfg = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    train = {s.prompt for seed in range(5) for s in make_addition_dataset("train", 300, seed=seed, **cfg)}
    evals = make_addition_dataset("eval", 50, seed=0, **cfg)
    tune = make_addition_dataset("tune", 50, seed=0, **cfg)
    assert len(train) > 70  # nearly the whole item space is drawn for training ...
    assert train.isdisjoint(s.prompt for s in evals) and train.isdisjoint(s.prompt for s in tune)  # ... but never these
    assert {s.prompt for s in evals}.isdisjoint(s.prompt for s in tune)
    assert {split_of(s.prompt) for s in evals} == {"eval"} and {bucket(s.prompt) for s in tune} == {HELD_OUT["tune"]}
    raw = generate_entries("basic_arithmetic", split="train", size=300, seed=0, operators=("+",),
                           allow_parentheses=False, allow_negation=False, **cfg)
    assert sum(f"Q{e['metadata']['expression'].replace(' ', '')}:" in train for e in raw) > 200  # naive draws overlap


def test_partition_hash_is_stable_and_balanced():
    """The bucket of a prompt is a fixed function of its text (documented salt and sha256), about 1/BUCKETS each."""
    import hashlib

    key = "Q0814+0707+0965:"
    assert bucket(key) == int(hashlib.sha256((SALT + key).encode()).hexdigest()[:16], 16) % BUCKETS
    counts = [0] * BUCKETS
    for i in range(16000):
        counts[bucket(f"Q{i:05d}:")] += 1
    assert min(counts) > 850 and max(counts) < 1150
    assert split_share("train") == pytest.approx(1 - len(HELD_OUT) / BUCKETS)
    with pytest.raises(ValueError, match="split must be"):
        split_share("test")


def test_held_out_set_too_large_for_the_item_space_is_one_clear_error():
    """A task whose every item is one training prompt has no eval items: a UserError, not an endless draw."""
    key = next(f"Q{i}:" for i in range(100) if split_of(f"Q{i}:") == "train")
    with pytest.raises(UserError, match=r"only 0 of 3 items of the 'eval' split in \d+ generator draws.*too small"):
        draw_split("chain_sum", split="eval", size=3, seed=0, key=lambda e: key)


@pytest.mark.parametrize("name", ["countdown", "chain_sum", "basic_arithmetic"])
def test_builtin_tasks_generate(name):
    s = make_task_dataset(name, size=3, seed=5)
    assert len(s) == 3 and all(x.task == name and x.answer for x in s)


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task_dataset("nope", size=1, seed=0)
    with pytest.raises(ValueError, match="split must be"):
        make_task_dataset("chain_sum", split="test", size=1, seed=0)
    with pytest.raises(ValueError, match="size must be"):
        make_task_dataset("chain_sum", size=0, seed=0)


# ---------------------------------------------------------------- addition task


def test_addition_trace_documented_example():
    assert addition_prompt([814, 707, 965]) == "Q0814+0707+0965:"
    assert addition_trace([814, 707, 965]) == "4+7+5+0=16;1+0+6+1=8;8+7+9+0=24;0+0+0+2=2;A2486"
    assert addition_trace([9999, 9999, 9999]).endswith("9+9+9+2=29;A29997")
    assert addition_trace([1, 2]) == "1+2+0=3;0+0+0=0;0+0+0=0;0+0+0=0;A3"
    with pytest.raises(ValueError):
        addition_trace([10000, 1])


def _check_trace(terms: list[int], trace: str, width: int = 4) -> None:
    """Re-derive every step of a trace from the terms, independently of `addition_trace`."""
    assert TRACE_RE.fullmatch(trace)
    *steps, final = trace.split(";")
    assert len(steps) == width and final == f"A{sum(terms)}"
    carry, low_digits = 0, []
    for col, step in enumerate(steps):
        lhs, rhs = step.split("=")
        addends = [int(x) for x in lhs.split("+")]
        assert addends[:-1] == [(t // 10**col) % 10 for t in terms] and addends[-1] == carry
        assert int(rhs) == sum(addends)
        carry = int(rhs) // 10
        low_digits.append(int(rhs) % 10)
    total = int(steps[-1].split("=")[1]) * 10 ** (width - 1) + sum(d * 10**i for i, d in enumerate(low_digits[:-1]))
    assert total == sum(terms)


def test_addition_traces_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        terms = [rng.randrange(10 ** rng.randint(1, 4)) for _ in range(rng.randint(2, 3))]
        _check_trace(terms, addition_trace(terms))


def test_addition_dataset(char_tok):
    train = make_addition_dataset("train", 64, seed=1)
    assert train == make_addition_dataset("train", 64, seed=1)
    evals = make_addition_dataset("eval", 64, seed=1)
    assert [s.prompt for s in train] != [s.prompt for s in evals]
    assert make_task_dataset("addition", size=64, seed=1) == train
    n_terms = set()
    for s in train:
        terms = s.meta["terms"]
        n_terms.add(len(terms))
        assert re.fullmatch(r"Q\d{4}(\+\d{4}){1,2}:", s.prompt) and s.task == "addition"
        assert s.prompt == addition_prompt(terms) and s.answer == str(sum(terms))
        _check_trace(terms, s.meta["target"])
        ids = char_tok(s.prompt + s.meta["target"] + char_tok.eos_token)["input_ids"]
        assert char_tok.unk_token_id not in ids and ids[-1] == char_tok.eos_token_id
    assert n_terms == {2, 3}
    with pytest.raises(ValueError, match="fixes"):
        make_addition_dataset("train", 2, seed=1, operators=("+", "-"))
