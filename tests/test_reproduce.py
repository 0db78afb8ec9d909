"""The reproduction driver: the tuning grid and its rule, the lanes, the statistics (fast), and
`python -m rlad_megatron.reproduce --quick` end to end (slow): the pair, tuning, finals, rlad-eval, the measured
held-out overlap, and a report whose tables are recomputed here from the runs' own files."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rlad_megatron.reproduce.lanes import Job, Lanes
from rlad_megatron.reproduce.recipe import (
    KNOB,
    METHOD_LABEL,
    METHODS,
    QUICK,
    ROOT,
    TUNE_SEED,
    Recipe,
    Setting,
    knob_grid,
    pair_commands,
    rl_command,
    select,
    training_sets,
    tuning_grid,
)
from rlad_megatron.reproduce.report import paired_ci
from rlad_megatron.reproduce.runs import read_metrics, run_path, tune_score

K = QUICK["final_k"]


# ------------------------------------------------------------------------------------------------ fast


def test_every_method_gets_the_same_grid():
    r = Recipe()
    sizes = {m: len(tuning_grid(m, r)) + len(knob_grid(Setting(m, 1e-4, 2))) for m in METHODS}
    assert set(sizes.values()) == {len(r.tune_lr) * len(r.tune_updates) + 2}
    assert {s.knob_value for s in knob_grid(Setting("rlad", 1e-4, 2))} == {0.3, 0.7}
    assert {s.knob_value for s in knob_grid(Setting("kdrl", 3e-5, 4))} == {0.01, 1.0}
    assert {s.lr for s in knob_grid(Setting("sft", 1e-4, 1))} == {3e-4, 1e-3}
    assert all(s.num_updates == 2 and s.lr == 1e-4 for s in knob_grid(Setting("grpo", 1e-4, 2)))


def test_selection_rule_best_score_ties_to_smaller_lr_times_updates():
    a, b, c = Setting("grpo", 1e-4, 4), Setting("grpo", 3e-5, 1), Setting("grpo", 1e-4, 1)
    assert select({a: 0.40, b: 0.40, c: 0.39}) == b
    assert select({a: 0.41, b: 0.40, c: 0.39}) == a


def test_commands_differ_only_in_the_method_and_its_knob(tmp_path):
    r = Recipe()

    def argv(s: Setting) -> list[str]:
        cmd = " ".join(rl_command(s, 7, 100, "tune", tmp_path / "RUN", r, tmp_path / "pair"))
        cmd = re.sub(r"--algo \S+|--teacher-hf \S+|--kl-coef \S+|--ref-kl-coef \S+|--kl-estimator \S+|--alpha \S+|"
                     r"--sft-source \S+", "", cmd)
        return cmd.split()

    assert len({tuple(argv(Setting(m))) for m in METHODS}) == 1
    assert "--eval-split tune" in " ".join(rl_command(Setting("grpo"), 7, 100, "tune", tmp_path, r, tmp_path))
    assert "--ref-kl-coef 0.01" in " ".join(rl_command(Setting("grpo", knob=0.01), 7, 100, "tune", tmp_path, r, tmp_path))


def test_the_heldout_check_regenerates_exactly_the_sets_the_commands_train_on(tmp_path):
    r = Recipe()

    def size_seed(argv: list[str]) -> tuple[int, int]:
        return int(argv[argv.index("--train-size") + 1]), int(argv[argv.index("--seed") + 1])

    drawn = {size_seed(argv) for name, argv, _ in pair_commands(tmp_path, r) if name.startswith("sft_")}
    drawn.add(size_seed(rl_command(Setting("rlad"), TUNE_SEED, r.tune_iters, "tune", tmp_path, r, tmp_path)))
    drawn |= {size_seed(rl_command(Setting("grpo"), s, r.rl_iters, "eval", tmp_path, r, tmp_path))
              for s in r.final_seeds}
    assert drawn == set(training_sets(r).values()) and len(drawn) == 3 + len(r.final_seeds)


def test_paired_ci_is_the_t_interval():
    c = paired_ci([0.5, 0.6, 0.55, 0.52, 0.58], [0.5, 0.5, 0.5, 0.5, 0.5])
    d = [0.0, 0.1, 0.05, 0.02, 0.08]
    se = statistics.stdev(d) / 5**0.5
    assert c["mean"] == pytest.approx(0.05) and c["hi"] - c["mean"] == pytest.approx(2.7764451 * se, rel=1e-6)
    assert paired_ci([0.5], [0.4])["lo"] is None


def test_lanes_respect_prerequisites_and_add_follow_ups(tmp_path):
    order = tmp_path / "order.txt"

    def job(name: str, needs=(), then=list) -> Job:
        return Job(name, [sys.executable, "-c", f"open({str(order)!r}, 'a').write('{name}\\n')"],
                   done=lambda: name in (order.read_text().split() if order.exists() else []), needs=needs, then=then)

    Lanes(tmp_path, 2).run([job("a"), job("b", ("a",), then=lambda: [job("c", ("b",))]), job("d")])
    seq = order.read_text().split()
    assert sorted(seq) == ["a", "b", "c", "d"] and seq.index("a") < seq.index("b") < seq.index("c")
    record = json.loads((tmp_path / "jobs.json").read_text())
    assert set(record) == {"a", "b", "c", "d"} and all(v["seconds"] > 0 for v in record.values())
    Lanes(tmp_path, 2).run([job("a")])  # done: reused, not rerun
    assert order.read_text().split().count("a") == 1
    with pytest.raises(RuntimeError, match="job bad failed"):
        Lanes(tmp_path, 1).run([Job("bad", [sys.executable, "-c", "raise SystemExit(3)"], done=lambda: False)])


# ------------------------------------------------------------------------------------------------ slow: --quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repro") / "q"
    docs = out.parent / "docs_must_stay_empty"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "rlad_megatron.reproduce", "--quick", "--out", str(out),
                        "--docs", str(docs)], env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert not docs.exists(), "--quick must not write the docs"
    return out


def table_rows(md: str, header_start: str) -> dict[str, list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def finals_of(out: Path) -> dict[str, tuple[Setting, list[list[dict]]]]:
    tuning = json.loads((out / "tuning.json").read_text())
    r = Recipe(**QUICK)
    res = {}
    for m in METHODS:
        s = Setting(**tuning[m]["chosen"])
        res[m] = (s, [read_metrics(run_path(out, "final", s, seed) / "metrics.jsonl") for seed in r.final_seeds])
    return res


@pytest.mark.slow
def test_quick_heldout_overlap_is_measured_and_zero(quick_run: Path):
    ho = json.loads((quick_run / "heldout.json").read_text())
    assert ho["eval_vs_training"] == ho["tune_vs_training"] == ho["eval_vs_tune"] == 0
    # distinct prompts (a 2-digit --quick set may repeat one), against every training set of every stage
    assert 0 < ho["sizes"]["eval"] <= QUICK["eval_size"] and 0 < ho["sizes"]["tune"] <= QUICK["eval_size"]
    assert ho["training_union"] > 5_000 and set(ho["eval_vs_each"].values()) == {0}
    md = (quick_run / "reproduction.md").read_text()
    assert (f"**Overlap: 0 of the {ho['sizes']['eval']} final-eval prompts and 0 of the {ho['sizes']['tune']} "
            "tuning-eval prompts") in md


@pytest.mark.slow
def test_quick_tuning_follows_the_rule(quick_run: Path):
    tuning = json.loads((quick_run / "tuning.json").read_text())
    for m in METHODS:
        t = tuning[m]
        scores = {}
        for name, x in t["stage1"].items():
            s = Setting(**x["setting"])
            d = run_path(quick_run, "tune", s, TUNE_SEED)
            assert x["score"] == tune_score(read_metrics(d / "metrics.jsonl")) and s.name == name
            scores[s] = x["score"]
        assert len(scores) == len(tuning_grid(m, Recipe(**QUICK)))
        assert Setting(**t["chosen"]) == select(scores)


@pytest.mark.slow
def test_quick_report_tables_are_parsed_from_the_runs(quick_run: Path):
    md = (quick_run / "reproduction.md").read_text()
    assert "--quick smoke run" in md
    rows = table_rows(md, "| method | setting | greedy acc.")
    finals = finals_of(quick_run)
    per_method = {}
    for m, (s, runs) in finals.items():
        finals_m = []
        for rows_m in runs:
            curve = {r["step"]: r["eval/mean@1"] for r in rows_m if "eval/mean@1" in r}
            assert sorted(curve) == list(range(0, QUICK["rl_iters"] + 1, QUICK["eval_interval"]))
            finals_m.append(curve[QUICK["rl_iters"]])
        per_method[m] = finals_m
        cells = rows[METHOD_LABEL[m]]
        assert cells[0] == f"`{s.name}`"
        assert cells[1] == f"{statistics.fmean(finals_m) * 100:.1f} ± {statistics.stdev(finals_m) * 100:.1f}"
        assert cells[2] == " / ".join(f"{x * 100:.1f}" for x in finals_m)
    diffs = table_rows(md, "| comparison | mean")
    c = paired_ci(per_method["rlad"], per_method["grpo"])
    assert diffs["RLAD − GRPO"][0] == f"{c['mean'] * 100:+.1f}"
    assert diffs["RLAD − GRPO"][1] == f"[{c['lo'] * 100:+.1f}, {c['hi'] * 100:+.1f}]"


@pytest.mark.slow
def test_quick_trrd_vs_grpo_is_pooled_from_the_logs(quick_run: Path):
    from rlad_megatron.losses.trrd_vs_grpo import pooled_ratios

    _, runs = finals_of(quick_run)["rlad"]
    keys = ("sumsq_diff", "sumsq_grpo", "sumsq_trrd", "sumsq_diff_pos", "sumsq_grpo_pos", "sumsq_diff_neg",
            "sumsq_grpo_neg")
    sums = {k: sum(r.get(f"actor/grpo_weight_{k}", 0.0) for rows in runs for r in rows if r["step"] > 0) for k in keys}
    assert sums["sumsq_grpo"] > 0
    rel = pooled_ratios(sums)["rel_diff"]
    md = (quick_run / "reproduction.md").read_text()
    assert f"| relative norm of the weight difference | {rel:.3f} |" in md
    assert re.search(r"\| gated: GRPO passes a gradient, TRRD does not \(% of tokens\) \| – \| \d+\.\d\d \|", md)


@pytest.mark.slow
def test_quick_report_prints_runnable_commands_and_a_real_plot(quick_run: Path):
    import matplotlib.image as mpimg
    import numpy as np

    md = (quick_run / "reproduction.md").read_text()
    assert str(quick_run) not in md and sys.executable not in md and str(ROOT) not in md
    block = md.split("## Commands", 1)[1].split("```")[1]
    assert sum("-m rlad_megatron.train" in line and "$OUT/final/" in line for line in block.splitlines()) == \
        len(METHODS) * len(QUICK["final_seeds"])
    assert "python -m rlad_megatron.reproduce.heldout" in block
    assert KNOB["rlad"][0] == "alpha" and "--alpha 0.5" in block
    png = quick_run / "reproduction_accuracy.png"
    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 1000
    assert len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
