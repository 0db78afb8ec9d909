"""Bad input to every command line (rlad-train, rlad-eval, both converters): one line `<prog>: error: <flag/file>:
...` on stderr, exit code 2, no traceback, nothing written at the output path, before any model is built.

The table runs each entry point's `main` in this process (the wrapper exits exactly as the real command does,
and the errors come before torch.distributed starts); the `slow` tests check real processes: a 1-rank
`python -m rlad_megatron.train`, a 2-rank torchrun launch (only rank 0 prints), and the documented successes
(converting training checkpoints, resuming without `latest`). One subprocess builds the tiny models and
checkpoints for the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlad_megatron.data.char_tokenizer import VOCAB
from tests.conftest import ROOT, torchrun_env

TRAIN_BASE = ["--no-chat-template", "--train-size", "16", "--max-response-len", "4", "--rollout-batch-size", "1",
              "--n-samples-per-prompt", "2", "--micro-batch-size", "2", "--train-iters", "1"]

SETUP = """
import shutil, sys
from pathlib import Path
from rlad_megatron import platform
from rlad_megatron.checkpoint import save_checkpoint
from rlad_megatron.convert import load_hf_into_megatron, save_megatron_checkpoint
from rlad_megatron.models.builder import build_model
from rlad_megatron.models.families import spec_from_hf_config
from rlad_megatron.tiny import make_tiny_model
from rlad_megatron.optim import build_optimizer

root = Path(sys.argv[1])
student = make_tiny_model(root / "student", "test", seed=0)
make_tiny_model(root / "teacher", "test", seed=1)
platform.init(platform.Layout())
model = build_model(spec_from_hf_config(student))
load_hf_into_megatron(model, student)
# a training checkpoint as rlad-train writes it: model, the run's (fp32 Adam) optimizer and scheduler, train state
ddp, optimizer, scheduler = build_optimizer(model, lr=1e-4, lr_decay_steps=1)
ddp.zero_grad_buffer()
optimizer.zero_grad()
optimizer.step()  # one step with zero gradients: Adam state with a step count, weights unchanged
scheduler.step(1)
save_checkpoint(root / "save", 1, model, optimizer, scheduler,
                train_state={"step": 1, "prompt_position": 1, "sft_pos": 0})
save_megatron_checkpoint(model, root / "mcore")
platform.shutdown()
"""


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> dict[str, Path]:
    """Tiny student/teacher HF dirs, a training save dir (`iter_0000001` + `latest`), a model-only checkpoint, and
    broken copies of them."""
    root = tmp_path_factory.mktemp("user_errors")
    p = subprocess.run([sys.executable, "-c", SETUP, str(root)], env=torchrun_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    f = {name: root / name for name in ("student", "teacher", "save", "mcore")}

    def copy(src: str, dst: str) -> Path:
        f[dst] = root / dst
        shutil.copytree(f[src], f[dst])
        return f[dst]

    (copy("save", "no_latest") / "latest").unlink()
    shard = copy("save", "truncated_shard") / "iter_0000001" / "dist" / "__0_1.distcp"
    f["shard"], f["shard_size"] = shard, shard.stat().st_size
    os.truncate(shard, shard.stat().st_size // 2)
    (copy("save", "half_written") / "iter_0000001" / "train_state.json").unlink()
    shutil.rmtree(copy("save", "dangling") / "iter_0000001")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy("student", "no_tokenizer") if name == "tokenizer.json" else f["no_tokenizer"]).joinpath(name).unlink()
    st = copy("student", "truncated_st") / "model.safetensors"
    os.truncate(st, st.stat().st_size - 100)
    other = copy("teacher", "teacher_other_tok")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["a"], tok["model"]["vocab"]["b"] = tok["model"]["vocab"]["b"], tok["model"]["vocab"]["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    f["bad_jsonl"] = root / "bad.jsonl"
    f["bad_jsonl"].write_text('{"prompt": "Q0001+0002:", "answer": "3", "task": "addition"}\n{"prompt": "Q0003+00\n')
    f["empty_jsonl"] = root / "empty.jsonl"
    f["empty_jsonl"].write_text("\n")
    f["out"] = root / "out"  # every case's output path: must never appear
    return f


def _tool(name: str) -> Callable[[list[str]], None]:
    from rlad_megatron.errors import run_cli

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda argv: run_cli(name, module.main, argv)


def _entry(prog: str) -> Callable[[list[str]], None]:
    if prog == "rlad-train":
        from rlad_megatron.train import main
    elif prog == "rlad-eval":
        from rlad_megatron.eval import main
    else:
        main = _tool(prog)
    return main


def train(f, *extra: str, algo: str = "grpo") -> list[str]:
    return [*TRAIN_BASE, "--algo", algo, "--student-hf", str(f["student"]), "--teacher-hf", str(f["teacher"]),
            "--output-dir", str(f["out"]), *extra]


def evaluate(f, *extra: str) -> list[str]:
    return ["--data", "builtin:addition", "--size", "2", "--k", "1", "--no-chat-template", "--quiet",
            "--output-json", str(f["out"] / "eval.json"), *extra]


@dataclass(frozen=True)
class Case:
    name: str
    prog: str
    argv: Callable[[dict], list[str]]
    message: Callable[[dict], str]  # the exact text after `<prog>: error: `
    env: dict = field(default_factory=dict)


def _truncated(f) -> str:
    return (f"{f['shard']}: truncated ({f['shard_size'] // 2} bytes, .metadata needs {f['shard_size']}) (incomplete "
            "checkpoint)")


def _json_error(f) -> str:
    try:
        json.loads(f["bad_jsonl"].read_text().splitlines(keepends=True)[1])
    except json.JSONDecodeError as e:
        return f"{e.msg.removesuffix(' at')} at column {e.colno}"
    raise AssertionError


_n, _a = len(VOCAB), VOCAB["a"]  # the tiny models' char tokenizer; the broken teacher copy swaps 'a' and 'b'
assert VOCAB["b"] == _a + 1


CASES = [
    Case("malformed JSONL line", "rlad-train",
         lambda f: train(f, "--prompt-data", str(f["bad_jsonl"])),
         lambda f: f"--prompt-data {f['bad_jsonl']}:2: invalid JSON ({_json_error(f)})"),
    Case("missing prompt file", "rlad-train",
         lambda f: train(f, "--prompt-data", str(f["out"] / "nope.jsonl")),
         lambda f: f"--prompt-data {f['out'] / 'nope.jsonl'}: no such file"),
    Case("unknown reward", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--reward", "nope"),
         lambda f: "--reward nope: unknown reward 'nope'; use one of knights_knaves, countdown, chain_sum, "
                   "basic_arithmetic, reasoning_gym, math, addition or 'package.module:function'"),
    Case("unknown builtin task", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:nope"),
         lambda f: "--prompt-data builtin:nope: unknown task 'nope'; built-ins: knights_knaves, countdown, chain_sum, "
                   "basic_arithmetic, addition or a reasoning-gym dataset name"),
    Case("student dir without tokenizer", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--student-hf", str(f["no_tokenizer"])),
         lambda f: f"--student-hf {f['no_tokenizer']}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                   "pass --tokenizer DIR"),
    Case("teacher TP x PP does not divide the world size", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--teacher-tensor-model-parallel-size", "2",
                         algo="rlad"),
         lambda f: "--teacher-tensor-model-parallel-size 2 x --teacher-pipeline-model-parallel-size 1 = 2 (teacher "
                   "TP*PP) does not divide the world size 1 (processes started by torchrun)"),
    Case("KV heads not divisible by TP", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--tensor-model-parallel-size", "4"),
         lambda f: "--tensor-model-parallel-size 4: the student's num_key_value_heads=2 is not divisible by it (pick a "
                   "TP that divides 2)",
         env={"WORLD_SIZE": "4"}),
    Case("student and teacher tokenizers differ", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--teacher-hf", str(f["teacher_other_tok"]),
                         algo="rlad"),
         lambda f: f"--teacher-hf {f['teacher_other_tok']}: student and teacher tokenizers differ (vocab sizes {_n} "
                   f"vs {_n}; e.g. student has [('a', {_a}), ('b', {_a + 1})], teacher has [('a', {_a + 1}), ('b', "
                   f"{_a})]). TRRD needs the teacher's log-prob of the student's exact token ids: use a teacher with "
                   "the same tokenizer."),
    Case("--student-load given a training checkpoint", "rlad-train",
         lambda f: [*train(f, "--prompt-data", "builtin:addition"), "--student-hf", "", "--student-load",
                    str(f["save"]), "--tokenizer", str(f["student"])],
         lambda f: f"--student-load {f['save']}: an rlad-train --save dir (training checkpoints), not a model-only "
                   "checkpoint; export it with tools/convert_megatron_to_hf.py, or resume from it with --load"),
    Case("--student-load without --tokenizer", "rlad-train",
         lambda f: [*train(f, "--prompt-data", "builtin:addition"), "--student-hf", "", "--student-load",
                    str(f["mcore"])],
         lambda f: "--tokenizer: required with --student-load (a Megatron checkpoint has no tokenizer files)"),
    Case("truncated .distcp shard under --load", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--load", str(f["truncated_shard"])),
         lambda f: f"--load {_truncated(f)}"),
    Case("half-written checkpoint under --load", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--load", str(f["half_written"])),
         lambda f: f"--load {f['half_written'] / 'iter_0000001' / 'train_state.json'}: missing (incomplete "
                   "checkpoint)"),
    Case("--load: latest names a missing iteration", "rlad-train",
         lambda f: train(f, "--prompt-data", "builtin:addition", "--load", str(f["dangling"])),
         lambda f: f"--load {f['dangling'] / 'latest'}: names step 1 but {f['dangling'] / 'iter_0000001'} does not "
                   "exist and there is no other iter_* checkpoint"),
    Case("rlad-eval on an empty prompt file", "rlad-eval",
         lambda f: ["--model", str(f["student"]), *evaluate(f, "--data", str(f["empty_jsonl"]))],
         lambda f: f"--data {f['empty_jsonl']}: no prompts in file (expected one JSON object per line, or Parquet "
                   "rows)"),
    Case("rlad-eval on a Megatron checkpoint without --tokenizer", "rlad-eval",
         lambda f: ["--model", str(f["mcore"]), *evaluate(f)],
         lambda f: f"--model {f['mcore']}: a Megatron checkpoint (megatron) has no tokenizer; pass --tokenizer DIR"),
    Case("rlad-eval on a missing model dir", "rlad-eval",
         lambda f: ["--model", str(f["out"] / "nope"), *evaluate(f)],
         lambda f: f"--model {f['out'] / 'nope'}: no such directory"),
    Case("rlad-eval on a truncated training checkpoint", "rlad-eval",
         lambda f: ["--model", str(f["truncated_shard"]), "--tokenizer", str(f["student"]), *evaluate(f)],
         lambda f: f"--model {_truncated(f)}"),
    Case("truncated model.safetensors", "convert_hf_to_megatron",
         lambda f: ["--hf-dir", str(f["truncated_st"]), "--save", str(f["out"])],
         lambda f: f"--hf-dir {f['truncated_st'] / 'model.safetensors'}: not a readable safetensors file (Error while "
                   "deserializing header: incomplete metadata, file not fully covered); the file is truncated or "
                   "corrupt"),
    Case("HF -> Megatron, existing --save", "convert_hf_to_megatron",
         lambda f: ["--hf-dir", str(f["student"]), "--save", str(f["mcore"])],
         lambda f: f"--save {f['mcore']}: already exists (pass --overwrite to replace it)"),
    Case("template without tokenizer files", "convert_megatron_to_hf",
         lambda f: ["--load", str(f["mcore"]), "--hf-template", str(f["no_tokenizer"]), "--save", str(f["out"])],
         lambda f: f"--hf-template {f['no_tokenizer']}: no tokenizer files (tokenizer.json / tokenizer_config.json), "
                   "so the export would not load with AutoTokenizer; pass --tokenizer DIR to copy them from there"),
    Case("Megatron -> HF, truncated training checkpoint", "convert_megatron_to_hf",
         lambda f: ["--load", str(f["truncated_shard"] / "iter_0000001"), "--hf-template", str(f["student"]),
                    "--save", str(f["out"])],
         lambda f: f"--load {_truncated(f)}"),
]


def _one_error_line(prog: str, err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0].removeprefix(f"{prog}: error: ")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case: Case, f, capsys, monkeypatch):
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RANK", raising=False)
    argv = case.argv(f)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _entry(case.prog)(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert _one_error_line(case.prog, err) == case.message(f)
    assert not f["out"].exists() or not any(f["out"].iterdir()), sorted(f["out"].iterdir())
    assert not (f["out"].parent / ".out.tmp").exists()


def test_debug_shows_the_traceback(f, capsys, monkeypatch):
    monkeypatch.setenv("RLAD_DEBUG", "1")
    with pytest.raises(SystemExit):
        _entry("rlad-eval")(["--model", str(f["out"] / "nope"), *evaluate(f)])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("rlad-eval: error: --model ")


def _run(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**torchrun_env(), **(env or {})}, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_real_process_exit_code_and_single_line(f):
    p = _run([sys.executable, "-m", "rlad_megatron.train", *train(f, "--prompt-data", str(f["bad_jsonl"]))])
    assert p.returncode == 2, p.stderr[-3000:]
    assert _one_error_line("rlad-train", p.stderr) == CASES[0].message(f)
    assert not f["out"].exists()


@pytest.mark.slow
def test_torchrun_only_rank0_prints(f, tmp_path):
    """Both ranks fail the same check before torch.distributed starts: rank 0 prints the line and exits 2, rank 1
    (still in its grace period) is stopped by torchrun. torchrun then prints its own ChildFailedError summary."""
    logs = tmp_path / "logs"
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
              str(logs), "--redirects", "3", "-m", "rlad_megatron.train",
              *train(f, "--prompt-data", str(f["bad_jsonl"]))],
             env={"RLAD_ERROR_GRACE_S": "300"})  # ranks reach the check far apart on a loaded CI box
    assert p.returncode != 0
    assert "exitcode  : 2" in p.stderr and "ChildFailedError" in p.stderr, p.stderr[-3000:]
    rank_err = {int(d.name): (d / "stderr.log").read_text() for d in logs.glob("*/attempt_0/*")}
    assert sorted(rank_err) == [0, 1], sorted(logs.rglob("*"))
    assert _one_error_line("rlad-train", rank_err[0]) == CASES[0].message(f)
    assert "error" not in rank_err[1] and "Traceback" not in rank_err[1], rank_err[1]


@pytest.mark.slow
def test_megatron_to_hf_accepts_training_checkpoints(f, tmp_path):
    """The save dir (via `latest`) and an `iter_*` dir convert to HF dirs equal to the student's weights; a template
    without tokenizer files works with --tokenizer."""
    from safetensors.torch import load_file

    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("tool", {str(ROOT / 'tools/convert_megatron_to_hf.py')!r})
        tool = importlib.util.module_from_spec(spec); spec.loader.exec_module(tool)
        tool.main(["--load", {str(f['save'])!r}, "--hf-template", {str(f['student'])!r},
                   "--save", {str(tmp_path / 'from_save')!r}])
        tool.main(["--load", {str(f['no_latest'] / 'iter_0000001')!r}, "--hf-template", {str(f['no_tokenizer'])!r},
                   "--tokenizer", {str(f['student'])!r}, "--save", {str(tmp_path / 'from_iter')!r}])
    """)
    p = _run([sys.executable, "-c", script])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"reading training checkpoint {f['no_latest'] / 'iter_0000001'} (step 1)" in p.stdout, p.stdout
    ref = load_file(f["student"] / "model.safetensors")
    for out in (tmp_path / "from_save", tmp_path / "from_iter"):
        assert {p.name for p in out.iterdir()} >= {"config.json", "tokenizer.json", "tokenizer_config.json",
                                                    "model.safetensors.index.json"}
        got = {}
        for shard in out.glob("model-*.safetensors"):
            got |= load_file(shard)
        assert got.keys() == ref.keys() and all((got[k] == ref[k]).all() for k in ref)


@pytest.fixture(scope="module")
def resumed_without_latest(f, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    cmd = [sys.executable, "-m", "rlad_megatron.train", *train(f, "--prompt-data", "builtin:addition", "--reward",
                                                                 "tests.loop_rewards:length_parity"),
           "--output-dir", str(out), "--load", str(f["no_latest"])]
    return _run(cmd), out


@pytest.mark.slow
def test_load_without_latest_says_which_checkpoint(f, resumed_without_latest):
    p, _ = resumed_without_latest
    assert p.returncode == 0, p.stderr[-3000:]
    assert (f"rlad-train: {f['no_latest']} has no 'latest' file; resuming from the newest complete checkpoint "
            "iter_0000001 (step 1)") in p.stdout.splitlines(), p.stdout


@pytest.mark.slow
def test_load_without_latest_resumes_the_newest_complete_iteration(resumed_without_latest):
    p, out = resumed_without_latest
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert 1 not in steps, steps  # resumed at step 1 of --train-iters 1: nothing left to train
