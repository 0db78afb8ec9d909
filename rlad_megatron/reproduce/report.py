"""The report of a finished reproduction, parsed back from the runs' own files (metrics.jsonl, rlad-eval JSON,
tuning.json, heldout.json, jobs.json): tables, paired differences with 95% confidence intervals, the TRRD-vs-GRPO
update diagnostics, the reading (each sentence computed from the numbers above it) and the PNG."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from rlad_megatron.losses.trrd_vs_grpo import pooled_ratios
from rlad_megatron.reproduce.recipe import (
    DIAGNOSTICS,
    KNOB,
    METHOD_LABEL,
    SELECTION_RULE,
    Recipe,
    Setting,
)
from rlad_megatron.reproduce.runs import eval_curve, mean_of, read_metrics, run_path, sum_of
from rlad_megatron.reproduce.text import diagnostics_rows, reading, settings_lines

SUMS = [f"sumsq_{w}{tag}" for w in ("diff", "grpo") for tag in ("", "_pos", "_neg")] + ["sumsq_trrd"]


def load(out: Path, pair: Path) -> dict:
    """Everything the report shows, from the files of `out` and `pair`."""
    rec = json.loads((out / "recipe.json").read_text())
    r = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec.items()})
    tuning = json.loads((out / "tuning.json").read_text())
    finals = {}
    for m in r.methods:
        s = Setting(**tuning[m]["chosen"])
        runs = []
        for seed in r.final_seeds:
            d = run_path(out, "final", s, seed)
            rows = read_metrics(d / "metrics.jsonl")
            curve = eval_curve(rows)
            ev = json.loads((d / "eval.json").read_text())["benchmarks"]["addition"]["metrics"]
            runs.append({"seed": seed, "curve": curve, "before": curve[0][1], "final": curve[-1][1], "sampled": ev,
                         "diag": {k: mean_of(rows, k) for k in DIAGNOSTICS},
                         "gates": {k: mean_of(rows, f"actor/gate_{k}") for k in
                                   ("blocked_pos", "blocked_neg", "enabled_pos", "enabled_neg")},
                         "sums": {k: sum_of(rows, f"actor/grpo_weight_{k}") for k in SUMS},
                         "overlap": max((row.get("data/eval_train_overlap", 0) for row in rows), default=0)})
        finals[m] = {"setting": s, "runs": runs}
    evals = {k: json.loads((out / "evals" / f"{k}.json").read_text())["benchmarks"]["addition"]["metrics"]
             for k in ("student_before", "teacher")}
    sft = {who: eval_curve(read_metrics(pair / f"sft_{who}" / "metrics.jsonl")) for who in ("teacher", "student")}
    jobs = json.loads((out / "jobs.json").read_text())
    return {"recipe": r, "tuning": tuning, "finals": finals, "evals": evals, "sft": sft, "jobs": jobs,
            "heldout": json.loads((out / "heldout.json").read_text()),
            "meta": json.loads((out / "meta.json").read_text()), "params": param_counts(pair)}


def param_counts(pair: Path) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for who in ("teacher", "student"):
        n = 0
        for f in sorted((pair / who).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
        out[who] = n
    return out


def paired_ci(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a - b, their mean and the 95% t confidence interval (None with one seed)."""
    from scipy.stats import t as student_t

    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"d": d, "mean": mean, "lo": None, "hi": None, "p": None}
    se = statistics.stdev(d) / math.sqrt(len(d))
    half = student_t.ppf(0.975, len(d) - 1) * se
    p = float(2 * student_t.sf(abs(mean / se), len(d) - 1)) if se > 0 else (0.0 if mean else 1.0)
    return {"d": d, "mean": mean, "lo": mean - half, "hi": mean + half, "p": p}


def trrd_vs_grpo(data: dict) -> dict | None:
    """Pooled over RLAD's final runs (all steps, all seeds): rel. norm of the weight difference, cosine, gates."""
    if "rlad" not in data["finals"]:
        return None
    runs = data["finals"]["rlad"]["runs"]
    sums = {k: sum(x["sums"][k] for x in runs) for k in SUMS}
    if sums["sumsq_grpo"] <= 0:
        return None
    gates = {k: statistics.fmean(x["gates"][k] for x in runs if x["gates"][k] is not None) for k in runs[0]["gates"]
             if any(x["gates"][k] is not None for x in runs)}
    per_seed = [pooled_ratios(x["sums"]).get("rel_diff") for x in runs]
    return {**pooled_ratios(sums), "gates": gates, "per_seed": per_seed,
            "clamp": statistics.fmean(x["diag"]["actor/teacher_clamp_frac"] for x in runs
                                      if x["diag"]["actor/teacher_clamp_frac"] is not None),
            "ratio_mean": statistics.fmean(x["diag"]["actor/ratio_mean"] for x in runs)}


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x * 100:.{digits}f}"


def ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs) * 100:.1f} ± {(statistics.stdev(xs) if len(xs) > 1 else 0.0) * 100:.1f}"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = data["recipe"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    colors = {"grpo": "tab:blue", "kdrl": "tab:orange", "rlad": "tab:green", "sft": "tab:red"}
    for m, f in data["finals"].items():
        steps = [s for s, _ in f["runs"][0]["curve"]]
        cols = [[dict(x["curve"]).get(s, float("nan")) * 100 for x in f["runs"]] for s in steps]
        axes[0].plot(steps, [statistics.fmean(c) for c in cols], marker="o", ms=3, color=colors[m],
                     label=f"{METHOD_LABEL[m]} ({f['setting'].name})")
        axes[0].fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=colors[m], alpha=0.15)
    teacher = data["sft"]["teacher"][-1][1] * 100
    axes[0].axhline(teacher, color="gray", ls="--", lw=1, label=f"teacher ({teacher:.1f}%)")
    axes[0].set(title=f"held-out accuracy (greedy, {r.eval_size} prompts), mean of {len(r.final_seeds)} seeds, "
                      "band = min..max", xlabel="RL step", ylabel="accuracy (%)")
    if "rlad" in data["finals"]:
        for x in data["finals"]["rlad"]["runs"]:
            rows = read_metrics(run_path(Path(data["out"]), "final", data["finals"]["rlad"]["setting"], x["seed"])
                                / "metrics.jsonl")
            pts = [(row["step"], pooled_ratios({k: row.get(f"actor/grpo_weight_{k}", 0.0) for k in SUMS}))
                   for row in rows if "actor/grpo_weight_sumsq_grpo" in row]
            xs = [s for s, v in pts if "rel_diff" in v]
            axes[1].plot(xs, [v["rel_diff"] for s, v in pts if "rel_diff" in v], lw=0.8, alpha=0.7)
        axes[1].set(title="RLAD: ||w_TRRD - w_GRPO|| / ||w_GRPO|| per step (one line per seed)", xlabel="RL step",
                    ylabel="relative weight difference")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tuning_table(data: dict) -> list[str]:
    L = ["| method | setting | stage | tuning score (%) | chosen |", "|---|---|---|---:|:---:|"]
    for m, t in data["tuning"].items():
        chosen = Setting(**t["chosen"]).name if t["chosen"] else None
        for stage in ("stage1", "stage2"):
            for name, x in t[stage].items():
                L.append(f"| {m.upper()} | `{name}` | {stage[-1]} | {x['score'] * 100:.1f} | "
                         f"{'**yes**' if name == chosen else ''} |")
    return L


def write_report(out: Path, pair: Path, *, quick: bool) -> Path:
    data = load(out, pair)
    data["out"] = str(out)
    r, finals, ev = data["recipe"], data["finals"], data["evals"]
    k, ho = r.final_k, data["heldout"]
    md, png = out / "reproduction.md", out / "reproduction_accuracy.png"
    plot(data, png)
    teacher_g, student_g = data["sft"]["teacher"][-1][1], data["sft"]["student"][-1][1]
    L = ["# Tiny CPU reproduction: GRPO vs KDRL vs RLAD (TRRD) vs offline SFT distillation", ""]
    if quick:
        L += ["> **--quick smoke run**: tiny budgets; the numbers carry no information about the methods.", ""]
    L += [(f"Written by `python -m rlad_megatron.reproduce{' --quick' if quick else ''}` "
          f"(`examples/reproduce_tiny.sh`) on {time.strftime('%Y-%m-%d')}; every number is parsed back from the runs' "
          "own files. Task: column addition with an explicit carry trace "
          f"(`builtin:addition`, `{' '.join('--task-config ' + c for c in r.task_config)}`), binary exact-answer "
          "reward, a char-level Qwen2 pair trained here from nothing."), ""]
    L += ["## Held-out by construction", "",
          (f"**Overlap: {ho['eval_vs_training']} of the {ho['sizes']['eval']} final-eval prompts and "
          f"{ho['tune_vs_training']} of the {ho['sizes']['tune']} tuning-eval prompts are among the "
          f"{ho['training_union']:,} distinct training prompts of all stages; eval ∩ tune = {ho['eval_vs_tune']}.** "
          "Every set was regenerated with the runs' own loader (`python -m rlad_megatron.reproduce.heldout`); each run "
          "also logged its own eval/train overlap (`data/eval_train_overlap`, max over the final runs "
          f"{max(x['overlap'] for f in finals.values() for x in f['runs']):.0f}). A prompt belongs to one split by "
          "a hash of its text (`rlad_megatron/data/partition.py`), so this holds for any seeds and sizes."), "",
          "| training set | prompts | shared with final eval |", "|---|---:|---:|"]
    L += [f"| {name} | {ho['sizes'][name]:,} | {n} |" for name, n in ho["eval_vs_each"].items()] + [""]
    L += ["## The pair", "",
          f"| model | parameters | greedy held-out acc. (%) | Mean@{k} (%) | Pass@{k} (%) |", "|---|---:|---:|---:|---:|",
          (f"| teacher (d=64, {r.teacher_iters} SFT steps) | {data['params']['teacher']:,} | {pct(teacher_g)} | "
          f"{pct(ev['teacher']['overall'][f'mean@{k}'])} | {pct(ev['teacher']['overall'][f'pass@{k}'])} |"),
          (f"| student (d=32, {r.student_iters} SFT steps) | {data['params']['student']:,} | {pct(student_g)} | "
          f"{pct(ev['student_before']['overall'][f'mean@{k}'])} | {pct(ev['student_before']['overall'][f'pass@{k}'])} |"),
          "", f"Teacher SFT curve (greedy %, every {max(r.teacher_iters // 4, 1)} steps): "
          + " / ".join(pct(v) for _, v in data["sft"]["teacher"]) + ".", ""]
    L += ["## Tuning (the same grid for every method)", "", f"Selection rule: {SELECTION_RULE}", "",
          f"Tuning runs: {r.tune_iters} RL steps on the tuning seed's prompts, scored on the `tune` split "
          f"({r.eval_size} prompts, disjoint from the final eval set and from all training prompts). Stage 1: lr in "
          f"{{{', '.join(f'{x:g}' for x in r.tune_lr)}}} x updates per rollout in "
          f"{{{', '.join(map(str, r.tune_updates))}}}; stage 2: "
          + "; ".join(f"{m.upper()} {KNOB[m][0]} in {{{', '.join(f'{v:g}' for v in KNOB[m][1])}}}" for m in r.methods)
          + ("" if r.tune_knobs else " (skipped in --quick)") + ".", "", *tuning_table(data), ""]
    L += ["## Result: final runs, 5 seeds" if len(r.final_seeds) == 5 else "## Result: final runs", "",
          (f"{r.rl_iters} RL steps per run at each method's chosen setting; seeds {', '.join(map(str, r.final_seeds))} "
          "(the training prompts, their order, rollout sampling; the same for every method, so differences are "
          f"paired). Greedy accuracy on the final eval split ({r.eval_size} prompts) at the last step; Mean@{k} / "
          f"Pass@{k}: `rlad-eval` of the final student, {k} samples at T={r.final_temperature}, top-p "
          f"{r.final_top_p}. Mean ± sample std over seeds."), "",
          f"| method | setting | greedy acc. (%) | per seed | Mean@{k} (%) | Pass@{k} (%) |",
          "|---|---|---:|---|---:|---:|",
          (f"| student before RL | – | {pct(finals[r.methods[0]]['runs'][0]['before'])} | – | "
          f"{pct(ev['student_before']['overall'][f'mean@{k}'])} | {pct(ev['student_before']['overall'][f'pass@{k}'])} |")]
    for m, f in finals.items():
        rs = f["runs"]
        L.append(f"| {METHOD_LABEL[m]} | `{f['setting'].name}` | {ms([x['final'] for x in rs])} | "
                 + " / ".join(pct(x["final"]) for x in rs) + f" | {ms([x['sampled']['overall'][f'mean@{k}'] for x in rs])}"
                 f" | {ms([x['sampled']['overall'][f'pass@{k}'] for x in rs])} |")
    L += ["", f"![held-out accuracy over steps]({png.name})", "", "### Paired differences (greedy accuracy, points)", "",
          "| comparison | mean | 95% CI | per seed | p (paired t) |", "|---|---:|---|---|---:|"]
    comps = {}
    for a, b in (("rlad", "grpo"), ("rlad", "kdrl"), ("rlad", "sft"), ("kdrl", "grpo"), ("sft", "grpo")):
        if a in finals and b in finals:
            c = comps[(a, b)] = paired_ci([x["final"] for x in finals[a]["runs"]], [x["final"] for x in finals[b]["runs"]])
            ci = "–" if c["lo"] is None else f"[{c['lo'] * 100:+.1f}, {c['hi'] * 100:+.1f}]"
            p = "–" if c["p"] is None else f"{c['p']:.3f}"
            L.append(f"| {a.upper()} − {b.upper()} | {c['mean'] * 100:+.1f} | {ci} | "
                     + ", ".join(f"{x * 100:+.1f}" for x in c["d"]) + f" | {p} |")
    diag = trrd_vs_grpo(data)
    L += ["", "## How far TRRD's update is from GRPO's", ""] + diagnostics_rows(diag, finals)
    L += ["", "## Reading", ""] + [f"* {s}" for s in reading(data, comps, diag, teacher_g, student_g)] + [""]
    L += ["## Settings", ""] + settings_lines(r) + [""]
    L += ["## Commands (in order of start; cwd = repository root; paths relative to it)", "", "```"]
    for j in data["jobs"].values():
        note = ("    # started by an earlier invocation; this one waited for it" if j.get("waited_for") else
                "    # reused from an earlier invocation" if j.get("reused") else "")
        L.append(relative(j["command"], out, pair) + note)
    L += ["```", ""]
    mi, meta = data["meta"]["machine"], data["meta"]
    secs = [j["seconds"] for j in data["jobs"].values() if j.get("seconds") and not j.get("waited_for")]
    L += ["## Machine and wall-clock", "", (f"* `nproc` {mi['nproc']}; CPU {mi['cpu']}; Python {mi['python']}, torch "
          f"{mi['torch']}; load average at start {mi['loadavg']}."),
          f"* Wall-clock of the driver: {meta['wall_s'] / 60:.1f} min with {r.lanes} jobs side by side"
          + (f" ({meta['invocations']} invocations, each continuing the last)" if meta.get("invocations", 1) > 1
             else "") + f"; {sum(secs) / 60:.1f} job-minutes in all.", ""]
    md.write_text("\n".join(L) + "\n")
    summary = {"recipe": {k2: v for k2, v in vars(r).items()}, "heldout": ho, "tuning": data["tuning"],
               "finals": {m: {"setting": f["setting"].name, "final": [x["final"] for x in f["runs"]]}
                          for m, f in finals.items()},
               "paired": {f"{a}-{b}": c for (a, b), c in comps.items()}, "trrd_vs_grpo": diag,
               "teacher_greedy": teacher_g, "student_greedy": student_g, "params": data["params"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return md


def relative(command: str, out: Path, pair: Path) -> str:
    """A command a reader can run: the work dir as `$OUT` (the pair as `$OUT/pair`), the interpreter as `python`."""
    import sys

    return command.replace(str(pair), "$OUT/pair").replace(str(out), "$OUT").replace(sys.executable, "python")
