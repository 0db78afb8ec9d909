"""`python -m rlad_megatron.reproduce --quick` end to end: the pair, the four methods, rlad-eval, and a report whose
table and PNG come from the run's own files (every number is recomputed here from metrics.jsonl / eval JSON)."""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rlad_megatron.reproduce import DIAGNOSTICS, METHOD_LABEL, METHODS, QUICK, ROOT, Recipe, pair_commands

pytestmark = pytest.mark.slow  # torchrun / subprocess runs

K = QUICK["final_k"]


def table_rows(md: str, header_start: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with `header_start`: first cell -> other cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pair_commands_are_the_tiny_example_commands(tmp_path):
    """The driver builds the pair flag for flag like examples/rlad_tiny_cpu.sh (guards against drift)."""
    text = (ROOT / "examples" / "rlad_tiny_cpu.sh").read_text().replace("\\\n", " ")
    arrays = {name: shlex.split(body) for name, body in re.findall(r"^(\w+)=\(([^)]*)\)", text, re.MULTILINE)}
    example = []
    for line in text.splitlines():
        line = line.strip()
        m = re.search(r"\$PY (tools/make_tiny_model\.py .*|-m rlad_megatron\.train .*)$", line)
        if m and "torch.distributed.run" not in line:
            argv = []
            for tok in shlex.split(m.group(1)):
                arr = re.fullmatch(r"\$\{(\w+)\[@\]\}", tok)
                argv += arrays[arr.group(1)] if arr else [tok.replace("$OUT", str(tmp_path))]
            example.append(argv)
    driver = [argv[1:] for _, argv, _ in pair_commands(tmp_path, Recipe(), "python")]
    assert len(example) == 4 and driver == example


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repro") / "q"
    docs = out.parent / "docs_must_stay_empty"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "rlad_megatron.reproduce", "--quick", "--out", str(out),
                        "--docs", str(docs)], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert not docs.exists(), "--quick must not write the docs"
    return out


def test_quick_report_table_is_parsed_from_the_runs(quick_run: Path):
    md = (quick_run / "reproduction.md").read_text()
    assert "--quick smoke run" in md
    rows = table_rows(md, "| method | final greedy acc.")
    assert set(rows) == {"student before training", *(METHOD_LABEL[m] for m in METHODS),
                         "teacher (reference, not trained here)"}
    befores = set()
    for m in METHODS:
        d = quick_run / "runs" / f"{m}_seed1"
        rows_m = metrics(d / "metrics.jsonl")
        curve = {r["step"]: r["eval/mean@1"] for r in rows_m if "eval/mean@1" in r}
        assert sorted(curve) == list(range(0, QUICK["rl_iters"] + 1, QUICK["eval_interval"]))
        befores.add(curve[0])
        cells = rows[METHOD_LABEL[m]]
        final = curve[QUICK["rl_iters"]] * 100
        assert cells[0] == f"{final:.1f} ± 0.0" and cells[1] == f"{final:.1f}"
        assert cells[2] == f"{max(curve.values()) * 100:.1f} ± 0.0"
        ev = json.loads((d / "eval.json").read_text())
        assert ev["settings"]["k"] == K and ev["model"].endswith("student_hf")
        overall = ev["benchmarks"]["addition"]["metrics"]["overall"]
        assert overall["prompts"] == QUICK["eval_size"]
        assert cells[3] == f"{overall[f'mean@{K}'] * 100:.1f} ± 0.0"
        assert cells[4] == f"{overall[f'pass@{K}'] * 100:.1f} ± 0.0"
        assert (d / "student_hf" / "config.json").exists()
    assert len(befores) == 1  # every run starts from the same student, evaluated on the same held-out set
    assert rows["student before training"][0] == f"{befores.pop() * 100:.1f}"
    teacher = json.loads((quick_run / "evals" / "teacher.json").read_text())["benchmarks"]["addition"]["metrics"]
    assert rows["teacher (reference, not trained here)"][3] == f"{teacher['overall'][f'mean@{K}'] * 100:.1f}"
    teacher_sft = metrics(quick_run / "pair" / "sft_teacher" / "metrics.jsonl")
    assert rows["teacher (reference, not trained here)"][0] == f"{teacher_sft[-1]['eval/mean@1'] * 100:.1f}"


def test_quick_report_diagnostics_and_commands(quick_run: Path):
    md = (quick_run / "reproduction.md").read_text()
    diag = table_rows(md, "| method | train reward")
    header = next(line for line in md.splitlines() if line.startswith("| method | train reward"))
    labels = [c.strip() for c in header.strip("|").split("|")][1:]
    key_of = {v: k for k, v in DIAGNOSTICS.items()}
    nontrivial = 0
    for m in METHODS:
        rows_m = [r for r in metrics(quick_run / "runs" / f"{m}_seed1" / "metrics.jsonl") if r["step"] > 0]
        for label, cell in zip(labels, diag[m.upper()], strict=True):
            vals = [r[key_of[label]] for r in rows_m if key_of[label] in r]
            assert cell == (f"{statistics.fmean(vals):.4f}" if vals else "–"), (m, label)
            nontrivial += bool(vals) and abs(statistics.fmean(vals)) > 1e-4
    assert nontrivial >= 8  # entropy, log-ratios, KL, ... really come from the logs
    # RLAD logs the teacher gates, GRPO has no teacher columns, SFT no RL columns
    assert diag["RLAD"][labels.index("gate blocked A>0")] != "–" and diag["GRPO"][labels.index("gate blocked A>0")] == "–"
    assert diag["SFT"][labels.index("zero-adv. groups")] == "–"

    # the training commands differ only in the method's own flags and the output paths
    block = md.split("## Commands", 1)[1].split("```")[1]
    train = {m: next(line for line in block.splitlines() if f"--algo {m} " in line and "torch.distributed.run" in line)
             for m in METHODS}

    def shared(cmd: str, method: str) -> str:
        cmd = re.sub(r"--algo \S+|--teacher-hf \S+|--kl-coef \S+|--kl-estimator \S+|--alpha \S+|--sft-source \S+",
                     "", cmd)
        return re.sub(rf"{method}_seed1", "RUN", cmd).split()

    assert all(shared(train[m], m) == shared(train["grpo"], "grpo") for m in METHODS)
    assert "--sft-source teacher" in train["sft"] and "--alpha 0.5" in train["rlad"]
    assert "## Machine and wall-clock" in md and "`uname -a`" in md and re.search(r"`nproc`: \d+", md)
    summary = json.loads((quick_run / "summary.json").read_text())
    assert set(summary["runs"]) == {f"{m}_seed1" for m in METHODS}


def test_quick_png_is_a_real_plot(quick_run: Path):
    import matplotlib.image as mpimg
    import numpy as np

    png = quick_run / "reproduction_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 1000
    colors = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50  # lines, bands, text: not a blank canvas
    assert "reproduction_accuracy.png" in (quick_run / "reproduction.md").read_text()
