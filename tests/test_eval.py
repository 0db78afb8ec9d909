"""rlad-eval: the unbiased pass@k estimator, per-subset grouping, and the CLI's JSON/Markdown output on a tiny
random model (HF dir and the same weights as a Megatron checkpoint)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlad_megatron.data.prompts import PromptSample
from rlad_megatron.eval import default_pass_ks, main, markdown_table, model_format, parse_task_config
from rlad_megatron.evaluation import pass_at_k, subset_of, summarize

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ metrics


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_mean_and_rejects_bad_args():
    for n, c in [(1, 0), (1, 1), (5, 2), (8, 7)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_summarize_groups_by_subset():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1], [0.0, 0.5, 1.0, 0.0]]
    subsets = ["b", "a", "b", "a", "c"]
    out = summarize(correct, subsets, [1, 2, 4])
    assert list(out) == ["overall", "a", "b", "c"]
    assert out["a"]["prompts"] == 2 and out["b"]["prompts"] == 2 and out["overall"]["prompts"] == 5
    assert out["a"]["mean@4"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["a"]["pass@2"] == pytest.approx((1.0 + pass_at_k(4, 2, 2)) / 2)
    assert out["b"]["pass@4"] == pytest.approx(0.5)
    # a partial score counts toward mean@n but not as a correct sample
    assert out["c"]["mean@4"] == pytest.approx(1.5 / 4) and out["c"]["pass@1"] == pytest.approx(0.25)
    for name, m in out.items():
        assert m["pass@1"] <= m["pass@2"] <= m["pass@4"], name
    assert out["overall"]["mean@4"] == pytest.approx(sum(sum(r) / 4 for r in correct) / 5)
    one_k = summarize(correct, subsets, 2)  # the trainer's call form: one int
    assert set(one_k["overall"]) == {"mean@4", "pass@2", "prompts"}
    with pytest.raises(ValueError):
        summarize([[1, 0], [1]], ["a", "a"], 1)
    with pytest.raises(ValueError):
        summarize(correct, subsets, 5)


def test_subset_labels():
    jsonl = PromptSample("q", "1", task="math", meta={"subset": "aime24", "level": 3})
    assert subset_of(jsonl) == "aime24"
    assert subset_of(jsonl, "level") == "math/level=3"
    assert subset_of(jsonl, "missing") == "math/missing=?"
    add = PromptSample("Q1+2:", "3", task="addition", meta={"terms": [1, 2], "rg_config": {"max_terms": 3}})
    assert subset_of(add) == "addition/terms=2"
    kk = PromptSample("q", "a", task="knights_knaves",
                      meta={"rg_config": {}, "rg_entry": {"metadata": {"difficulty": {"n_people": 4}}}})
    assert subset_of(kk) == "knights_knaves/n_people=4"
    assert subset_of(PromptSample("q", "a", task="countdown")) == "countdown"
    assert subset_of(PromptSample("q", "a")) == "all"


def test_task_config_sweep_and_default_ks():
    assert parse_task_config([]) == [{}]
    assert parse_task_config(["n_people=2,3", "depth-constraint=2"]) == [
        {"n_people": 2, "depth_constraint": 2}, {"n_people": 3, "depth_constraint": 2}]
    with pytest.raises(ValueError):
        parse_task_config(["n_people"])
    assert default_pass_ks(1) == [1] and default_pass_ks(8) == [1, 2, 4, 8] and default_pass_ks(6) == [1, 2, 4, 6]


# ------------------------------------------------------------------------------------------------ CLI

REWARD_MODULE = '''
def first_char_reward(response, sample):
    """Correct when the response starts with one of the characters listed in the sample's answer."""
    return float(bool(response) and response[0] in sample.answer)
'''


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from rlad_megatron.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "test", seed=3)


def write_bench(path: Path) -> Path:
    digits = "0123456789"
    rows = []
    for i in range(6):  # "easy": half the digits count, "hard": one digit; plus an addition-format prompt
        subset = "easy" if i % 2 == 0 else "hard"
        rows.append({"prompt": f"Q{i:04d}+{i + 1:04d}:", "answer": digits[:5] if subset == "easy" else "7",
                     "task": "first_char", "subset": subset})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rlad_eval_json_and_markdown(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "evalreward_mod.py").write_text(REWARD_MODULE)
    bench = write_bench(tmp_path / "bench.jsonl")
    out_json, out_md, dump = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "samples.jsonl"
    main(["--model", str(tiny_dir), "--data", str(bench), "--data", "builtin:addition", "--size", "4",
          "--k", "4", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "6", "--no-chat-template",
          "--reward", "evalreward_mod:first_char_reward", "--batch-size", "5",
          "--output-json", str(out_json), "--output-md", str(out_md), "--save-samples", str(dump)])
    result = json.loads(out_json.read_text())
    assert result["model_format"] == "hf" and result["settings"]["pass_k"] == [1, 2, 4]
    assert list(result["benchmarks"]) == ["bench", "addition"]
    m = result["benchmarks"]["bench"]["metrics"]
    assert list(m) == ["overall", "easy", "hard"] and m["easy"]["prompts"] == 3 and m["overall"]["prompts"] == 6
    add = result["benchmarks"]["addition"]["metrics"]
    assert add["overall"]["prompts"] == 4 and all(k.startswith("addition/terms=") for k in list(add)[1:])

    # the reported numbers are exactly the estimator applied to the dumped per-sample scores
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 10 and all(len(r["scores"]) == 4 and len(r["responses"]) == 4 for r in rows)
    bench_rows = [r for r in rows if r["benchmark"] == "bench"]
    for r in bench_rows:
        assert r["scores"] == [float(bool(t) and t[0] in r["answer"]) for t in r["responses"]]
    for subset in ("easy", "hard"):
        sub = [r["scores"] for r in bench_rows if r["subset"] == subset]
        assert m[subset]["mean@4"] == pytest.approx(sum(map(sum, sub)) / (4 * len(sub)))
        assert m[subset]["pass@2"] == pytest.approx(sum(pass_at_k(4, int(sum(s)), 2) for s in sub) / len(sub))
    assert 0 < m["overall"]["mean@4"] < 1  # the random model makes a mixture of hits and misses

    md = out_md.read_text()
    assert md == markdown_table(result)
    assert "| benchmark | subset | prompts | mean@4 | pass@1 | pass@2 | pass@4 |" in md
    assert f"| bench | easy | 3 | {m['easy']['mean@4']:.3f} |" in md
    assert md in capsys.readouterr().out  # the table is also printed

    # the same flags with another --batch-size give the same samples (per-sequence seeds)
    main(["--model", str(tiny_dir), "--data", str(bench), "--k", "4", "--temperature", "1.0", "--top-p", "1.0",
          "--max-new-tokens", "6", "--no-chat-template", "--reward", "evalreward_mod:first_char_reward",
          "--batch-size", "7", "--save-samples", str(tmp_path / "s2.jsonl"), "--quiet"])
    again = [json.loads(line) for line in (tmp_path / "s2.jsonl").read_text().splitlines()]
    assert [r["responses"] for r in again] == [r["responses"] for r in bench_rows]


def test_rlad_eval_knights_knaves_by_number_of_people(tiny_dir, tmp_path):
    """A reasoning-gym set swept over a generator knob: one subset per value, scored by the task's reward."""
    out = tmp_path / "kk.json"
    main(["--model", str(tiny_dir), "--data", "builtin:knights_knaves", "--task-config", "n_people=2,3",
          "--size", "3", "--k", "2", "--max-new-tokens", "4", "--no-chat-template", "--quiet", "--output-json", str(out)])
    result = json.loads(out.read_text())
    bench = result["benchmarks"]["knights_knaves"]
    assert bench["reward"] == "knights_knaves"
    assert {k: v["prompts"] for k, v in bench["metrics"].items()} == {
        "overall": 6, "knights_knaves/n_people=2": 3, "knights_knaves/n_people=3": 3}
    assert bench["metrics"]["overall"]["mean@2"] == 0.0  # 4 random characters never solve a puzzle


def _cli_error(capsys, argv: list[str]) -> str:
    """Run `rlad-eval argv`, expect exit code 2 and return its one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("rlad-eval: error: ")]
    return line


def test_rlad_eval_rejects_bad_input(tiny_dir, tmp_path, capsys):
    assert "--pass-k 4: values must be in [1, --k=2]" in _cli_error(capsys, [
        "--model", str(tiny_dir), "--data", "builtin:addition", "--size", "2", "--k", "2", "--pass-k", "4",
        "--no-chat-template", "--quiet"])
    no_task = tmp_path / "nt.jsonl"
    no_task.write_text(json.dumps({"prompt": "Q1+1:", "answer": "2"}) + "\n")
    assert f"--data {no_task}: rows carry no 'task' name; pass --reward" in _cli_error(capsys, [
        "--model", str(tiny_dir), "--data", str(no_task), "--k", "1", "--no-chat-template", "--quiet"])
    with pytest.raises(ValueError, match="Hugging Face dir"):
        model_format(tmp_path)


@pytest.mark.slow
def test_rlad_eval_megatron_checkpoint_matches_hf(tiny_dir, tmp_path):
    """The same weights as a model-only Megatron checkpoint and as an rlad-train --save checkpoint (built at TP=1
    in-process, exported into the engine) give exactly the samples of the HF dir."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    ckpt = tmp_path / "mcore"
    train_ckpt = tmp_path / "train_save"
    save_train = textwrap.dedent(f"""
        from rlad_megatron import platform
        from rlad_megatron.checkpoint import save_checkpoint
        from rlad_megatron.convert import load_hf_into_megatron
        from rlad_megatron.models.builder import build_model
        from rlad_megatron.models.families import spec_from_hf_config
        platform.init(platform.Layout())
        model = build_model(spec_from_hf_config({str(tiny_dir)!r}))
        load_hf_into_megatron(model, {str(tiny_dir)!r})
        save_checkpoint({str(train_ckpt)!r}, 3, model, train_state={{"step": 3}})
        platform.shutdown()
    """)
    script = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, {str(ROOT / 'tools/convert_hf_to_megatron.py')!r}, '--hf-dir', {str(tiny_dir)!r},
                        '--save', {str(ckpt)!r}], check=True)
        subprocess.run([sys.executable, '-c', {save_train!r}], check=True)
        from rlad_megatron.eval import main
        common = ['--data', 'builtin:addition', '--size', '6', '--k', '3', '--max-new-tokens', '8',
                  '--no-chat-template', '--quiet']
        main(['--model', {str(ckpt)!r}, '--tokenizer', {str(tiny_dir)!r}, '--output-json', {str(tmp_path / 'm.json')!r},
              '--save-samples', {str(tmp_path / 'm.jsonl')!r}, *common])
        main(['--model', {str(tiny_dir)!r}, '--output-json', {str(tmp_path / 'h.json')!r},
              '--save-samples', {str(tmp_path / 'h.jsonl')!r}, *common])
        main(['--model', {str(train_ckpt)!r}, '--tokenizer', {str(tiny_dir)!r},
              '--save-samples', {str(tmp_path / 't.jsonl')!r}, *common])
        try:
            main(['--model', {str(ckpt)!r}, *common])
        except SystemExit as e:
            assert e.code == 2, e
        else:
            raise AssertionError('a Megatron checkpoint without --tokenizer must be refused')
    """)
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240,
                       check=False, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"rlad-eval: error: --model {ckpt}: a Megatron checkpoint (megatron) has no tokenizer; pass --tokenizer DIR" \
        in p.stderr.splitlines(), p.stderr[-2000:]
    assert model_format(ckpt) == "megatron"
    meg, hf = json.loads((tmp_path / "m.json").read_text()), json.loads((tmp_path / "h.json").read_text())
    assert meg["model_format"] == "megatron" and hf["model_format"] == "hf"
    assert meg["benchmarks"] == {**hf["benchmarks"], "addition": {**hf["benchmarks"]["addition"],
                                                                  "seconds": meg["benchmarks"]["addition"]["seconds"]}}
    m_rows = [json.loads(x)["responses"] for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    h_rows = [json.loads(x)["responses"] for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    t_rows = [json.loads(x)["responses"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert m_rows == h_rows == t_rows and len(m_rows) == 6
    assert model_format(train_ckpt) == "megatron-train" and model_format(train_ckpt / "iter_0000003") == "megatron-train"
