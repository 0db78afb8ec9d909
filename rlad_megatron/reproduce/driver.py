"""Tiny CPU reproduction of RLAD's comparison: GRPO vs KDRL vs RLAD (TRRD, alpha 0.5) vs offline SFT distillation.

    python -m rlad_megatron.reproduce                 # full run (~40 min on 2 cores): writes docs/reproduction.md
    python -m rlad_megatron.reproduce --quick --out /tmp/q      # CI smoke run (a few minutes), writes only to --out
    python -m rlad_megatron.reproduce --tune --out /tmp/tune    # the short tuning grid the full recipe was fixed from

Stages (every one a subprocess running project code only, offline and seeded; logs under `<out>/logs/`):

1. The tiny pair with the exact commands of `examples/rlad_tiny_cpu.sh`: random Qwen2 models over the char
   tokenizer (teacher d=64, student d=32), teacher SFT on column-addition traces for longer, student SFT briefly.
2. For every method and seed, `rlad-train` on the student with identical budgets and hyper-parameters apart
   from the method (same RL steps, prompts per step, samples per prompt, lr, schedule, updates per rollout,
   training prompts, held-out set, and the same ranks: student TP=1 x DP=2, teacher TP=2):
   `grpo`; `kdrl` (+ kl_coef KL(student||teacher), k2); `rlad` (TRRD, alpha 0.5, clip 0.2/0.28, clamp 1);
   `sft --sft-source teacher` (offline distillation: the teacher samples n answers for the same training
   prompts the RL methods see, correct ones are kept, the student is fine-tuned on them with the same number
   of steps and sequences per step).
   Held-out accuracy (greedy, `--eval-size` builtin eval items, fixed `--eval-seed`) is logged every
   `eval_interval` steps to `metrics.jsonl`, and the final student is exported as an HF dir.
3. `rlad-eval` (Mean@k / Pass@k at the paper's eval sampling, T=0.6, top-p 0.95) of every final student, of
   the student before training and of the teacher, with per-subset numbers (2 vs 3 terms).
4. The report: the table (mean and spread over seeds; numbers parsed back from each run's own metrics and
   eval JSON), the diagnostics (zero-advantage groups, clip and teacher-gate fractions, teacher/student
   log-ratio), the commands, the machine, the wall-clock, and the accuracy-over-steps PNG.

`--quick` uses tiny budgets and writes only under `--out`; the full run writes `docs/reproduction.md` and
`docs/reproduction_accuracy.png` (plus a copy of both under `--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform as pyplatform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlad_megatron.reproduce.recipe import (
    ENV,
    METHODS,
    QUICK,
    ROOT,
    TUNE_BUDGET,
    TUNE_GRID,
    TUNE_KL,
    TUNE_TOL,
    Recipe,
    eval_argv,
    pair_commands,
    rl_command,
    run_dir,
)
from rlad_megatron.reproduce.report import (
    collect,
    eval_curve,
    mean_of,
    pair_hashes,
    read_metrics,
    tuning_table,
    write_report,
)

# ------------------------------------------------------------------------------------------------ running


@dataclass
class Log:
    out: Path
    commands: list[dict] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, argv: list[str], *, skip_if: Path | None = None) -> float:
        """Run one stage as a subprocess (cwd = repo root), its output to logs/<name>.log. Returns seconds."""
        entry = {"name": name, "command": "OMP_NUM_THREADS=1 " + shlex.join(argv)}
        self.commands.append(entry)
        if skip_if is not None and skip_if.exists():
            entry["skipped"] = True
            print(f"[reproduce] {name}: {skip_if} exists, reused", flush=True)
            return 0.0
        log_path = self.out / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[reproduce] {name} ...", flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with log_path.open("w") as f:
            p = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
        dt = time.perf_counter() - t0
        entry["seconds"] = dt
        self.stages[name] = dt
        if p.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"stage {name} failed (exit {p.returncode}); log {log_path}:\n{tail}")
        print(f"[reproduce] {name}: {dt:.0f} s", flush=True)
        return dt

    def run_eval(self, name: str, argv: list[str]) -> float:
        """rlad-eval in this process (the same `main` as the console script)."""
        from rlad_megatron.eval import main as eval_main

        self.commands.append({"name": name, "command": "OMP_NUM_THREADS=1 rlad-eval " + shlex.join(argv)})
        t0 = time.perf_counter()
        eval_main(argv)
        dt = time.perf_counter() - t0
        self.commands[-1]["seconds"] = dt
        self.stages[name] = dt
        return dt


def run_complete(d: Path, r: Recipe) -> bool:
    """A finished run of this recipe: metrics up to the last step with its eval, and the exported student."""
    m = d / "metrics.jsonl"
    if not m.exists() or not (d / "student_hf" / "config.json").exists():
        return False
    rows = read_metrics(m)
    return any(row["step"] == r.rl_iters and "eval/mean@1" in row for row in rows)


def build_pair(log: Log, pair: Path, r: Recipe) -> None:
    pair.mkdir(parents=True, exist_ok=True)
    for name, argv, produces in pair_commands(pair, r, sys.executable):
        log.run(name, argv, skip_if=produces)


def train_all(log: Log, out: Path, pair: Path, r: Recipe, *, resume: bool) -> None:
    for seed in r.seeds:
        for method in r.methods:
            d = run_dir(out, method, seed)
            argv = rl_command(method, seed, r, out, pair, sys.executable)
            if d.exists() and not (resume and run_complete(d, r)):
                shutil.rmtree(d)
            log.run(f"{method}_seed{seed}", argv, skip_if=d / "metrics.jsonl" if resume else None)
            if not run_complete(d, r):
                raise RuntimeError(f"{d}: the run did not log the final eval at step {r.rl_iters}")


def eval_all(log: Log, out: Path, pair: Path, r: Recipe) -> None:
    (out / "evals").mkdir(parents=True, exist_ok=True)
    log.run_eval("eval_student_before", eval_argv(pair / "student", out / "evals" / "student_before.json", r))
    log.run_eval("eval_teacher", eval_argv(pair / "teacher", out / "evals" / "teacher.json", r))
    for seed in r.seeds:
        for method in r.methods:
            d = run_dir(out, method, seed)
            log.run_eval(f"eval_{method}_seed{seed}", eval_argv(d / "student_hf", d / "eval.json", r))


# ------------------------------------------------------------------------------------------------ parsing


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    def sh(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "unavailable"

    # `nproc` honours OMP_NUM_THREADS (set to 1 for every stage), so ask it without that variable
    return {"nproc": sh(["env", "-u", "OMP_NUM_THREADS", "-u", "OMP_THREAD_LIMIT", "nproc"]),
            "uname": sh(["uname", "-a"]), "cpu": cpu,
            "python": pyplatform.python_version(), "torch": torch.__version__,
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# ------------------------------------------------------------------------------------------------ tuning


def choose_shared(results: list[dict]) -> dict:
    """The tuning rule: the lr with the best final accuracy averaged over methods and update counts; then the
    largest updates-per-rollout (the setting where TRRD's trust region is active) unless fewer updates are
    better by more than `TUNE_TOL` (mean over methods, one seed: differences below that are eval noise)."""
    def mean(**cfg) -> float:
        return statistics.fmean(x["final"] for x in results if all(x[k] == v for k, v in cfg.items())
                                and x["kl_coef"] == results[0]["kl_coef"])

    lr = max(TUNE_GRID["lr"], key=lambda v: mean(lr=v))
    by_u = {u: mean(lr=lr, num_updates=u) for u in TUNE_GRID["num_updates"]}
    best_u = max(by_u.values())
    u = max(x for x in by_u if by_u[x] >= best_u - TUNE_TOL)
    return {"lr": lr, "num_updates": u}


def tune(out: Path, pair: Path, base: Recipe) -> None:
    """The short tuning grid (1 seed, `TUNE_BUDGET`, its own held-out seed); writes `<out>/tuning.{json,md}`."""
    log = Log(out)
    build_pair(log, pair, base)
    results = []

    def record(sub: Path, r: Recipe, cfg: dict) -> None:
        for m in r.methods:
            rows = read_metrics(run_dir(sub, m, r.seeds[0]) / "metrics.jsonl")
            curve = eval_curve(rows)
            results.append({**cfg, "kl_coef": r.kl_coef, "method": m, "final": curve[-1][1], "curve": curve,
                            "zero_adv": mean_of(rows, "rollout/zero_adv_group_frac")})

    for cfg in (dict(lr=lr, num_updates=u) for lr in TUNE_GRID["lr"] for u in TUNE_GRID["num_updates"]):
        r = dataclasses.replace(base, **TUNE_BUDGET, **cfg)
        sub = out / f"lr{cfg['lr']:g}_u{cfg['num_updates']}"
        train_all(log, sub, pair, r, resume=True)
        record(sub, r, cfg)
    best = choose_shared(results)
    kls = {base.kl_coef: statistics.fmean(x["final"] for x in results if x["method"] == "kdrl"
                                          and x["lr"] == best["lr"] and x["num_updates"] == best["num_updates"])}
    for kl in TUNE_KL:
        if kl == base.kl_coef:
            continue
        r = dataclasses.replace(base, **TUNE_BUDGET, **best, kl_coef=kl, methods=("kdrl",))
        sub = out / f"lr{best['lr']:g}_u{best['num_updates']}_kl{kl:g}"
        train_all(log, sub, pair, r, resume=True)
        record(sub, r, best)
        kls[kl] = results[-1]["final"]
    best_kl = max(kls, key=kls.get)
    info = {"best_shared": best, "best_kl_coef": best_kl, "results": results, "pair_sha256": pair_hashes(pair),
            "budget": TUNE_BUDGET, "grid": TUNE_GRID, "kl_grid": TUNE_KL, "tolerance": TUNE_TOL,
            "commands": log.commands}
    (out / "tuning.json").write_text(json.dumps(info, indent=1))
    text = tuning_table(info)
    (out / "tuning.md").write_text(text)
    print(text)




def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rlad_megatron.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="work dir (default outputs/reproduce, --quick: a new temp dir)")
    p.add_argument("--pair-dir", default=None, help="tiny pair dir (default <out>/pair; reused when complete)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="full run: where reproduction.md + PNG go")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny budgets, 1 seed, writes only to --out")
    p.add_argument("--tune", action="store_true", help="run the short tuning grid instead")
    p.add_argument("--resume", action="store_true", help="keep finished runs found in --out")
    p.add_argument("--tuning", default=None, help="tuning.json of a --tune run, shown in the report")
    p.add_argument("--report-only", action="store_true",
                   help="only re-render the report of a finished invocation in --out from its files")
    p.add_argument("--methods", nargs="*", default=None, choices=METHODS)
    p.add_argument("--seeds", nargs="*", type=int, default=None)
    for f in ("rl_iters", "eval_interval", "eval_size", "num_updates", "teacher_iters", "student_iters", "nproc",
              "teacher_tp", "final_k", "lr_warmup_steps"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    for f in ("lr", "kl_coef"):
        p.add_argument("--" + f.replace("_", "-"), type=float, default=None)
    a = p.parse_args(argv)

    overrides = dict(QUICK) if a.quick else {}
    for f in ("rl_iters", "eval_interval", "eval_size", "num_updates", "teacher_iters", "student_iters", "nproc",
              "teacher_tp", "final_k", "lr_warmup_steps", "lr", "kl_coef"):
        if getattr(a, f) is not None:
            overrides[f] = getattr(a, f)
    if a.methods:
        overrides["methods"] = tuple(a.methods)
    if a.seeds:
        overrides["seeds"] = tuple(a.seeds)
    r = dataclasses.replace(Recipe(), **overrides)
    r.check()
    if a.out:
        out = Path(a.out)
    elif a.quick:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="rlad_reproduce_quick_"))
    else:
        out = ROOT / "outputs" / ("tune" if a.tune else "reproduce")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pair = Path(a.pair_dir).resolve() if a.pair_dir else out / "pair"
    if a.tune:
        tune(out, pair, r)
        return {}

    if a.report_only:  # re-render the report of a finished invocation from its files (no training, no evals)
        saved = out / "meta.json" if (out / "meta.json").exists() else out / "summary.json"
        meta = json.loads(saved.read_text())
        meta = meta.get("meta", meta)
        rec = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").exists() else \
            json.loads((out / "summary.json").read_text())["recipe"]
        r = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec.items()})
        stages = {c["name"]: c["seconds"] for c in meta["commands"] if "seconds" in c}
        return finish(out, pair, r, meta, stages, quick=a.quick, docs=a.docs)

    t0 = time.perf_counter()
    machine = machine_info()
    log = Log(out)
    build_pair(log, pair, r)
    t_pair = time.perf_counter()
    train_all(log, out, pair, r, resume=a.resume)
    t_train = time.perf_counter()
    eval_all(log, out, pair, r)
    t_eval = time.perf_counter()
    meta = {"commands": log.commands, "machine": machine, "wall_s": t_eval - t0, "pair_s": t_pair - t0,
            "train_s": t_train - t_pair, "eval_s": t_eval - t_train,
            "tuning": json.loads(Path(a.tuning).read_text()) if a.tuning else None, "tuning_path": a.tuning}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(r), indent=1))
    return finish(out, pair, r, meta, log.stages, quick=a.quick, docs=a.docs)


def finish(out: Path, pair: Path, r: Recipe, meta: dict, stages: dict, *, quick: bool, docs: str) -> dict:
    """Parse the runs, write `<out>/reproduction.md`, the PNG and `summary.json`; full runs also copy both to docs."""
    data = collect(out, pair, r, stages)
    data["out"], data["pair"] = str(out), str(pair)
    md, png = out / "reproduction.md", out / "reproduction_accuracy.png"
    write_report(data, r, meta, md, png, quick=quick)
    summary = {"recipe": dataclasses.asdict(r), "meta": meta,
               "runs": {f"{m}_seed{s}": dict(x) for (m, s), x in data["runs"].items()},
               "evals": data["evals"], "teacher_greedy": data["teacher_greedy"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if not quick:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(docs) / "reproduction_accuracy.png")
        shutil.copy(md, Path(docs) / "reproduction.md")
    print(f"[reproduce] done in {meta['wall_s'] / 60:.1f} min: {md}" + ("" if quick else f" -> {docs}"), flush=True)
    return summary

