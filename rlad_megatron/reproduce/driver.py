"""Tiny CPU reproduction of RLAD's comparison, from nothing: GRPO vs KDRL vs RLAD (TRRD) vs offline SFT distillation.

    python -m rlad_megatron.reproduce                          # the full run: writes docs/reproduction.md + PNG
    python -m rlad_megatron.reproduce --quick --out /tmp/q     # CI smoke run, writes only to --out

Jobs (single-rank subprocesses, `Recipe.lanes` side by side, logs under `<out>/logs/`, offline and seeded):

1. The pair: random tiny Qwen2 models over the char tokenizer; the teacher (d=64) SFT on 4-digit column-addition
   traces for long, the student (d=32, 3.8x fewer parameters) briefly (`recipe.pair_commands`).
2. Tuning, the same grid for every method on the tuning seed, scored on the `tune` held-out split: lr x
   updates-per-rollout at the method's default knob, then the knob's other values at the chosen point
   (`recipe.SELECTION_RULE`, fixed before the grid runs).
3. Finals: each method at its chosen setting on `Recipe.final_seeds` (5), scored on the `eval` split.
4. `rlad-eval` (Mean@k / Pass@k at T=0.6, top-p 0.95) of every final student, the student before RL and the
   teacher; the measured overlap of every held-out set with every training set (`reproduce.heldout`).
5. The report (`reproduce.report`): `<out>/reproduction.md` + PNG (the full run also copies both to docs/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform as pyplatform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rlad_megatron.reproduce.lanes import Job, Lanes
from rlad_megatron.reproduce.recipe import (
    METHODS,
    QUICK,
    ROOT,
    TUNE_SEED,
    Recipe,
    Setting,
    eval_argv,
    knob_grid,
    pair_commands,
    rl_command,
    select,
    tuning_grid,
)
from rlad_megatron.reproduce.runs import read_metrics, run_done, run_path, tune_score


class Plan:
    """The job graph; the tuning stages decide the later jobs as their results come in (`tuning.json`)."""

    def __init__(self, out: Path, pair: Path, r: Recipe, wait_for: tuple[str, ...] = ()):
        self.out, self.pair, self.r, self.wait_for = out, pair, r, wait_for
        self.tuning: dict[str, dict] = {m: {"stage1": {}, "stage2": {}, "chosen": None} for m in r.methods}
        self.py = sys.executable

    def save_tuning(self) -> None:
        (self.out / "tuning.json").write_text(json.dumps(self.tuning, indent=1))

    def jobs(self) -> list[Job]:
        pair = {name: (argv, produces) for name, argv, produces in pair_commands(self.pair, self.r, self.py)}

        def pair_job(name: str, needs: tuple[str, ...] = ()) -> Job:
            argv, produces = pair[name]
            if name in self.wait_for and not (produces / "config.json").exists():
                # the same command is running in another process: this job only waits for its result
                return Job(name, [self.py, "-c", (f"import pathlib, time\nwhile not pathlib.Path("
                                  f"{str(produces / 'config.json')!r}).exists(): time.sleep(5)")],
                           done=lambda: (produces / "config.json").exists(), needs=needs, shown=argv)
            outputs = tuple(Path(argv[i + 1]) for i, x in enumerate(argv) if x in ("--out", "--output-dir", "--save-hf"))
            return Job(name, argv, done=lambda: (produces / "config.json").exists(), needs=needs, clean=outputs)

        jobs = [pair_job("make_teacher"), pair_job("make_student"), pair_job("sft_teacher", ("make_teacher",)),
                pair_job("sft_student", ("make_student",)),
                Job("heldout", [self.py, "-m", "rlad_megatron.reproduce.heldout", "--out", str(self.out),
                                "--recipe", str(self.out / "recipe.json")],
                    done=lambda: (self.out / "heldout.json").exists())]
        for method in sorted(self.r.methods, key=lambda m: m != "grpo"):  # GRPO needs no teacher: it starts first
            jobs += [self.train_job("tune", s, TUNE_SEED, stage="stage1") for s in tuning_grid(method, self.r)]
        jobs += [self.eval_job("eval_student_before", self.pair / "student", self.out / "evals" / "student_before.json",
                               ("sft_student",)),
                 self.eval_job("eval_teacher", self.pair / "teacher", self.out / "evals" / "teacher.json",
                               ("sft_teacher",))]
        return jobs

    def needs(self, method: str) -> tuple[str, ...]:
        return ("sft_student",) if method == "grpo" else ("sft_student", "sft_teacher")

    def train_job(self, kind: str, s: Setting, seed: int, stage: str = "") -> Job:
        r = self.r
        iters, split = (r.tune_iters, "tune") if kind == "tune" else (r.rl_iters, "eval")
        d = run_path(self.out, kind, s, seed)
        argv = rl_command(s, seed, iters, split, d, r, self.pair, self.py)
        name = f"{kind}_{s.name}_seed{seed}"

        def then() -> list[Job]:
            if kind == "tune":
                return self.tuned(s, stage, tune_score(read_metrics(d / "metrics.jsonl")))
            out_json = d / "eval.json"
            return [self.eval_job(f"eval_{s.name}_seed{seed}", d / "student_hf", out_json, ())]

        def done() -> bool:
            return run_done(d, iters)

        return Job(name, argv, done=done, needs=self.needs(s.method), then=then, clean=(d,))

    def eval_job(self, name: str, model: Path, out_json: Path, needs: tuple[str, ...]) -> Job:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        return Job(name, [self.py, "-m", "rlad_megatron.eval", *eval_argv(model, out_json, self.r)],
                   done=out_json.exists, needs=needs)

    def tuned(self, s: Setting, stage: str, score: float) -> list[Job]:
        """Record a tuning result; when a stage of the method is complete, select and add the next jobs."""
        t = self.tuning[s.method]
        t[stage][s.name] = {"setting": dataclasses.asdict(s), "score": score}
        self.save_tuning()
        if stage == "stage1" and len(t["stage1"]) == len(tuning_grid(s.method, self.r)):
            best = self.best(t["stage1"])
            knobs = knob_grid(best) if self.r.tune_knobs else []
            if knobs:
                return [self.train_job("tune", k, TUNE_SEED, stage="stage2") for k in knobs]
            return self.finals(best)
        if stage == "stage2" and len(t["stage2"]) == len(knob_grid(self.best(t["stage1"]))):
            return self.finals(self.best({**t["stage1"], **t["stage2"]}))
        return []

    @staticmethod
    def best(results: dict) -> Setting:
        return select({Setting(**x["setting"]): x["score"] for x in results.values()})

    def finals(self, chosen: Setting) -> list[Job]:
        self.tuning[chosen.method]["chosen"] = dataclasses.asdict(chosen)
        self.save_tuning()
        return [self.train_job("final", chosen, seed) for seed in self.r.final_seeds]


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    import torch

    nproc = subprocess.run(["env", "-u", "OMP_NUM_THREADS", "nproc"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return {"nproc": nproc, "cpu": cpu, "python": pyplatform.python_version(), "torch": torch.__version__,
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rlad_megatron.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="work dir (default outputs/reproduce; --quick: a new temp dir); "
                                               "finished jobs found there are reused")
    p.add_argument("--pair-dir", default=None, help="the pair's dir (default <out>/pair; reused when complete)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="full run: where reproduction.md + PNG go")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny budgets, writes only to --out")
    p.add_argument("--report-only", action="store_true", help="only re-render the report from --out's files")
    p.add_argument("--methods", nargs="*", default=None, choices=METHODS)
    p.add_argument("--lanes", type=int, default=None, help="parallel single-rank jobs (default 2)")
    p.add_argument("--wait-for", nargs="*", default=[], metavar="PAIR_JOB",
                   help="pair jobs (e.g. sft_teacher) still running elsewhere with the same commands (an earlier "
                        "invocation's orphans): wait for their outputs instead of starting them")
    a = p.parse_args(argv)

    overrides = dict(QUICK) if a.quick else {}
    if a.methods:
        overrides["methods"] = tuple(a.methods)
    if a.lanes:
        overrides["lanes"] = a.lanes
    r = dataclasses.replace(Recipe(), **overrides)
    r.check()
    if a.out:
        out = Path(a.out)
    elif a.quick:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="rlad_reproduce_quick_"))
    else:
        out = ROOT / "outputs" / "reproduce"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pair = Path(a.pair_dir).resolve() if a.pair_dir else out / "pair"
    if not a.report_only:
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(r), indent=1))
        # an interrupted invocation is continued by the next one (finished jobs are reused): the wall-clock adds up
        before = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
        meta = {"machine": before.get("machine") or machine_info(), "quick": a.quick,
                "invocations": before.get("invocations", 0) + 1}
        t0 = time.perf_counter()
        (out / "meta.json").write_text(json.dumps({**meta, "wall_s": before.get("wall_s", 0.0)}, indent=1))
        plan = Plan(out, pair, r, wait_for=tuple(a.wait_for))
        try:
            Lanes(out, r.lanes).run(plan.jobs())
        finally:
            meta["wall_s"] = before.get("wall_s", 0.0) + time.perf_counter() - t0
            (out / "meta.json").write_text(json.dumps(meta, indent=1))
    from rlad_megatron.reproduce.report import write_report

    md = write_report(out, pair, quick=a.quick)
    if not a.quick:
        Path(a.docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(md, Path(a.docs) / md.name)
        shutil.copy(md.with_name("reproduction_accuracy.png"), Path(a.docs) / "reproduction_accuracy.png")
    print(f"[reproduce] report: {md}" + ("" if a.quick else f" (copied to {a.docs})"), flush=True)
    return json.loads((out / "summary.json").read_text())
