"""The report of a finished reproduction, parsed back from the runs' own files: metrics and eval JSON,
the Markdown table, the verdict and diagnostics text, the tuning table and the accuracy-over-steps PNG."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from rlad_megatron.reproduce.recipe import DIAGNOSTICS, METHOD_LABEL, TUNE_BUDGET, Recipe, run_dir


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(step, held-out greedy accuracy) in step order; a step logged twice keeps its last value."""
    curve = {row["step"]: row["eval/mean@1"] for row in rows if "eval/mean@1" in row}
    return sorted(curve.items())


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [row[key] for row in rows if key in row and row["step"] > 0 and math.isfinite(row[key])]
    return sum(vals) / len(vals) if vals else None


def spread(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(out: Path, pair: Path, r: Recipe, stages: dict[str, float] | None = None) -> dict:
    """Everything the report shows, parsed from the runs' own files (`stages`: subprocess seconds per run)."""
    stages = stages or {}
    runs = {}
    for method in r.methods:
        for seed in r.seeds:
            d = run_dir(out, method, seed)
            rows = read_metrics(d / "metrics.jsonl")
            curve = eval_curve(rows)
            ev = json.loads((d / "eval.json").read_text())["benchmarks"]["addition"]["metrics"]
            runs[(method, seed)] = {
                "curve": curve, "before": curve[0][1], "final": curve[-1][1], "best": max(v for _, v in curve),
                "diag": {k: mean_of(rows, k) for k in DIAGNOSTICS},
                "diag_first": {k: mean_of([x for x in rows if x["step"] <= r.rl_iters // 4], k) for k in DIAGNOSTICS},
                "diag_last": {k: mean_of([x for x in rows if x["step"] > 3 * r.rl_iters // 4], k) for k in DIAGNOSTICS},
                "sampled": ev,
                # the whole subprocess (start-up, teacher traces, evals) when this invocation ran it
                "seconds": stages.get(f"{method}_seed{seed}") or rows[-1]["time"] - rows[0]["time"],
            }
    before = {k: json.loads((out / "evals" / f"{k}.json").read_text())["benchmarks"]["addition"]["metrics"]
              for k in ("student_before", "teacher")}
    teacher_rows = read_metrics(pair / "sft_teacher" / "metrics.jsonl")
    student_rows = read_metrics(pair / "sft_student" / "metrics.jsonl")
    return {"runs": runs, "evals": before, "teacher_greedy": eval_curve(teacher_rows)[-1][1],
            "student_greedy_sft": eval_curve(student_rows)[-1][1]}


# ------------------------------------------------------------------------------------------------ report


def fmt_ms(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = spread(xs)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def plot(data: dict, r: Recipe, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"grpo": "tab:blue", "kdrl": "tab:orange", "rlad": "tab:green", "sft": "tab:red"}
    for method in r.methods:
        curves = [data["runs"][(method, s)]["curve"] for s in r.seeds]
        steps = [st for st, _ in curves[0]]
        vals = [[dict(c).get(st, float("nan")) for st in steps] for c in curves]
        mean = [statistics.fmean(col) * 100 for col in zip(*vals)]
        lo = [min(col) * 100 for col in zip(*vals)]
        hi = [max(col) * 100 for col in zip(*vals)]
        ax = axes[0]
        ax.plot(steps, mean, marker="o", ms=3, color=colors[method], label=METHOD_LABEL[method])
        ax.fill_between(steps, lo, hi, color=colors[method], alpha=0.18)
        for key, ax in (("rollout/reward_mean", axes[1]), ("rollout/zero_adv_group_frac", axes[2])):
            if method == "sft":
                continue
            series = []
            for s in r.seeds:
                rows = read_metrics(run_dir(Path(data["out"]), method, s) / "metrics.jsonl")
                series.append({row["step"]: row[key] for row in rows if key in row})
            xs = sorted(set.intersection(*(set(x) for x in series)))
            w = max(1, len(xs) // 25)  # moving average over ~4% of the run
            ys = [statistics.fmean(statistics.fmean(x[st] for x in series) for st in xs[max(0, i - w + 1):i + 1])
                  for i in range(len(xs))]
            ax.plot(xs, ys, color=colors[method], label=METHOD_LABEL[method])
    teacher = data["teacher_greedy"] * 100
    axes[0].axhline(teacher, color="gray", ls="--", lw=1, label=f"teacher ({teacher:.1f}%)")
    axes[0].set(title=f"held-out accuracy (greedy, {r.eval_size} prompts)\nmean over {len(r.seeds)} seeds, "
                      "band = min..max", xlabel="RL step", ylabel="accuracy (%)")
    axes[1].set(title="training reward (T=1 samples), moving avg", xlabel="RL step", ylabel="mean reward")
    axes[2].set(title="zero-advantage groups (all rewards equal)", xlabel="RL step", ylabel="fraction of groups")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired(a: list[float], b: list[float]) -> tuple[list[float], float | None, float | None]:
    """Per-seed differences a - b, the paired t statistic and its two-sided p (None when undefined; p needs scipy)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    if len(d) < 2 or statistics.stdev(d) == 0:
        return d, None, None
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return d, t, None
    return d, t, float(2 * student_t.sf(abs(t), len(d) - 1))


def compare(a: str, b: str, finals: dict) -> tuple[str, bool]:
    """'<a> - <b> = +x points (per seed ...; paired t, p)' and whether the difference is established (every seed
    the same sign and p < 0.05)."""
    d, t, p = paired(finals[a], finals[b])
    mean = statistics.fmean(d)
    stats = "" if t is None else f"; paired t = {t:.2f}" + ("" if p is None else f", p = {p:.2f}")
    established = (p is not None and p < 0.05 and (all(x > 0 for x in d) or all(x < 0 for x in d)))
    return (f"{a.upper()} − {b.upper()} = {mean * 100:+.1f} points (per seed "
            + ", ".join(f"{x * 100:+.1f}" for x in d) + stats + ")"), established


def verdict(data: dict, r: Recipe) -> list[str]:
    """Data-driven sentences: who wins, by how much relative to the seed spread and the eval noise."""
    runs, seeds = data["runs"], r.seeds
    finals = {m: [runs[(m, s)]["final"] for s in seeds] for m in r.methods}
    means = {m: statistics.fmean(v) for m, v in finals.items()}
    before = runs[(r.methods[0], seeds[0])]["before"]
    p = max(min(before, 0.99), 0.01)
    se = math.sqrt(p * (1 - p) / r.eval_size)
    order = sorted(r.methods, key=lambda m: -means[m])
    out = ["Ranking by mean final held-out accuracy: "
           + " > ".join(f"{m.upper()} {means[m] * 100:.1f}%" for m in order)
           + f" (before training {before * 100:.1f}%; one eval of {r.eval_size} items has a binomial standard error "
           f"of about {se * 100:.1f} points at that accuracy)."]
    if "rlad" in finals and "grpo" in finals:
        text, established = compare("rlad", "grpo", finals)
        d = means["rlad"] - means["grpo"]
        if d > 0 and established:
            out.append(f"**RLAD beats GRPO here**: {text}.")
        elif d > 0:
            out.append(f"**RLAD does not clearly beat GRPO here**: {text}; {len(seeds)} seed(s) do not establish a "
                       "difference of this size.")
        else:
            out.append(f"**RLAD does not beat GRPO here**: {text}.")
    for other in ("kdrl", "sft"):
        if other in means and "rlad" in means:
            text, established = compare("rlad", other, finals)
            out.append(text + (" — established." if established else " — not established."))
    if len(seeds) > 1:
        out.append("Runs with the same seed share the training prompts, their order and the rollout sampling seeds "
                   "(common random numbers), so the per-seed differences are paired.")
    k = r.final_k
    rl = [m for m in r.methods if m != "sft"]
    te, greedy_t = data["evals"]["teacher"], data["teacher_greedy"]
    if rl:
        rl_final = statistics.fmean(v for m in rl for v in finals[m])
        rl_mk = statistics.fmean(runs[(m, s)]["sampled"]["overall"][f"mean@{k}"] for m in rl for s in seeds)
        rel = "below" if greedy_t < rl_final else "above"
        out.append(f"The teacher is a weak one here: greedy {greedy_t * 100:.1f}%, {rel} the RL students' final "
                   f"{rl_final * 100:.1f}% (Mean@{k} {te['overall'][f'mean@{k}'] * 100:.1f}% vs "
                   f"{rl_mk * 100:.1f}%), having started {(greedy_t - before) * 100:+.1f} points ahead of the student.")
    return out


def diagnostics_text(data: dict, r: Recipe) -> list[str]:
    """Sentences explaining the RL runs from their own diagnostics."""
    runs, seeds = data["runs"], r.seeds

    def avg(m: str, key: str, part: str = "diag") -> float | None:
        key = key if key in DIAGNOSTICS else f"actor/{key}"  # loss metrics are logged under actor/
        vals = [runs[(m, s)][part][key] for s in seeds if runs[(m, s)][part][key] is not None]
        return statistics.fmean(vals) if vals else None

    lines = []
    rl = [m for m in r.methods if m != "sft"]
    zs = {m: avg(m, "rollout/zero_adv_group_frac") for m in rl}
    if zs:
        lines.append("**Zero-advantage groups.** " + ", ".join(
            f"{m.upper()} {zs[m] * 100:.0f}%" for m in rl if zs[m] is not None)
            + " of the 8-sample groups had all-equal rewards (mean over steps and seeds; first quarter -> last "
            "quarter: " + ", ".join(
                f"{m.upper()} {avg(m, 'rollout/zero_adv_group_frac', 'diag_first') * 100:.0f}% -> "
                f"{avg(m, 'rollout/zero_adv_group_frac', 'diag_last') * 100:.0f}%" for m in rl) + "). "
            "In such a group every advantage is 0, so the GRPO and TRRD surrogates are exactly 0 for all its "
            "tokens: the teacher's probabilities enter TRRD only through the ratio that multiplies the advantage, "
            "so on these groups RLAD gets no teacher signal at all. KDRL's KL term, by contrast, is a dense "
            "per-token loss that acts on every sampled sequence, zero advantage or not.")
    if "rlad" in rl:
        g = {k: avg("rlad", k) for k in ("gate_blocked_pos", "gate_blocked_neg", "gate_enabled_pos",
                                          "gate_enabled_neg", "teacher_clamp_frac", "log_ratio_teacher_mean",
                                          "clip_frac_low", "clip_frac_high")}
        if g["gate_blocked_pos"] is not None:
            moved = sum(g[k] for k in ("gate_blocked_pos", "gate_blocked_neg", "gate_enabled_pos", "gate_enabled_neg"))
            live = 1.0 - (avg("rlad", "zero_adv_frac") or 0.0)  # tokens that carry a non-zero advantage
            lines.append(
                f"**Where RLAD's teacher acts.** Mean token fractions for RLAD: the teacher term in the ratio blocks "
                f"the policy gradient of {g['gate_blocked_pos'] * 100:.2f}% (A>0) and {g['gate_blocked_neg'] * 100:.2f}% "
                f"(A<0) of the response tokens that GRPO's ratio would update, and enables {g['gate_enabled_pos'] * 100:.2f}% "
                f"(A>0) / {g['gate_enabled_neg'] * 100:.2f}% (A<0) that GRPO's would clip; {moved * 100:.2f}% of all "
                f"tokens, {moved / max(live, 1e-9) * 100:.2f}% of the {live * 100:.0f}% that carry a non-zero "
                f"advantage. The student/teacher log-ratio log pi_S - log pi_T averages {g['log_ratio_teacher_mean']:+.3f} "
                f"nats per sampled token and {g['teacher_clamp_frac'] * 100:.1f}% of tokens hit the App.-B clamp "
                f"|log pi_S/pi_T| <= 1. Clip fractions (TRRD ratio): low {g['clip_frac_low'] * 100:.2f}%, high "
                f"{g['clip_frac_high'] * 100:.2f}%"
                + (f" vs GRPO's low {avg('grpo', 'clip_frac_low') * 100:.2f}%, high {avg('grpo', 'clip_frac_high') * 100:.2f}%."
                   if "grpo" in rl and avg("grpo", "clip_frac_low") is not None else "."))
            lines.append(
                "With " + (f"{r.num_updates} optimizer updates per rollout batch" if r.num_updates > 1 else
                           "one update per rollout batch") + ", " + (
                    "pi_S differs from pi_old from the second update on, so the TRRD trust region (centred on the "
                    "geometric mixture of pi_old and the teacher) actually clips; in the first update pi_S = pi_old "
                    "and TRRD only reweights each token's advantage by (pi_S/pi_T)^(1-alpha)."
                    if r.num_updates > 1 else
                    "pi_S = pi_old numerically, so TRRD only reweights each token's advantage by "
                    "(pi_S/pi_T)^(1-alpha) and masks the tokens whose ratio starts outside the clip range."))
    if "kdrl" in rl and avg("kdrl", "kl_teacher") is not None:
        lines.append(f"**KDRL.** The k2 estimate of KL(student||teacher) on sampled tokens averages "
                     f"{avg('kdrl', 'kl_teacher', 'diag_first'):.3f} in the first quarter and "
                     f"{avg('kdrl', 'kl_teacher', 'diag_last'):.3f} in the last; it enters the loss with kl_coef "
                     f"{r.kl_coef}, next to group-normalised advantages of magnitude about 1.")
    if "rlad" in rl and "grpo" in rl and avg("rlad", "gate_blocked_pos") is not None:
        moved = sum(avg("rlad", k) for k in ("gate_blocked_pos", "gate_blocked_neg", "gate_enabled_pos",
                                               "gate_enabled_neg"))
        live = max(1.0 - (avg("rlad", "zero_adv_frac") or 0.0), 1e-9)
        ratio_r, ratio_g = avg("rlad", "ratio_mean"), avg("grpo", "ratio_mean")
        gap = statistics.fmean(runs[("rlad", s)]["final"] - runs[("grpo", s)]["final"] for s in seeds)
        small = moved / live < 0.05 and abs(ratio_r - 1.0) < 0.1
        lines.append(
            f"**Reading.** TRRD differs from GRPO only through the ratio. Here it switched the policy gradient of "
            f"{moved / live * 100:.2f}% of the tokens that carry an advantage on or off, rescaled the others by a mean "
            f"ratio of {ratio_r:.3f} (GRPO's ratio: {ratio_g:.3f}), and {avg('rlad', 'rollout/zero_adv_group_frac') * 100:.0f}% "
            "of the groups carried no advantage, where the teacher has no say at all. "
            + ("The update RLAD applied was therefore GRPO's up to a small perturbation, and its final accuracy ended "
               if small else "That is a substantial change to GRPO's update; RLAD's final accuracy ended ")
            + f"{gap * 100:+.1f} points from GRPO's.")
    return lines


def write_report(data: dict, r: Recipe, meta: dict, md_path: Path, png_path: Path, quick: bool) -> str:
    runs, seeds = data["runs"], r.seeds
    k = r.final_k
    plot(data, r, png_path)
    befores = {runs[key]["before"] for key in runs}
    L = ["# Tiny CPU reproduction: GRPO vs KDRL vs RLAD vs offline SFT distillation", ""]
    if quick:
        L += ["> **--quick smoke run**: tiny budgets, the numbers carry no information about the methods.", ""]
    L += ["Written by `python -m rlad_megatron.reproduce" + (" --quick" if quick else "") + "` "
          f"({time.strftime('%Y-%m-%d %H:%M %Z')}); every number below is parsed back from the runs' own "
          "`metrics.jsonl` and `rlad-eval` JSON files. Task: column addition of 2-3 zero-padded 4-digit numbers "
          "with an explicit carry trace (`research/data_rewards.md` section 5); binary exact-answer reward; a "
          "randomly initialised char-level Qwen2 pair trained here from nothing (teacher d=64, student d=32).", ""]
    L += ["## Result", ""] + [f"* {s}" for s in verdict(data, r)] + [""]
    L += [(f"Held-out set: {r.eval_size} items of the builtin addition eval split (generator seed "
          f"{r.eval_seed} + 10^9, disjoint from all training seeds), identical for every run. Greedy accuracy is "
          f"logged every {r.eval_interval} RL steps; Mean@{k} / Pass@{k} are `rlad-eval` of the final student with "
          f"{k} samples per prompt at T={r.final_temperature}, top-p {r.final_top_p} (the paper's eval sampling). "
          f"Mean ± sample std over seeds {', '.join(map(str, seeds))}."), ""]
    hdr = (f"| method | final greedy acc. (%) | per seed | best eval during run (%) | Mean@{k} (%) | Pass@{k} (%) "
           f"| 2 terms Mean@{k} | 3 terms Mean@{k} | run wall-clock (s) |")
    L += [hdr, "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    sb, te = data["evals"]["student_before"], data["evals"]["teacher"]

    def sub(ev: dict, name: str) -> str:
        return f"{ev[name][f'mean@{k}'] * 100:.1f}" if name in ev else "–"

    L.append(f"| student before training | {statistics.fmean(befores) * 100:.1f} | – | – | "
             f"{sb['overall'][f'mean@{k}'] * 100:.1f} | {sb['overall'][f'pass@{k}'] * 100:.1f} | "
             f"{sub(sb, 'addition/terms=2')} | {sub(sb, 'addition/terms=3')} | – |")
    for m in r.methods:
        rs = [runs[(m, s)] for s in seeds]
        per = " / ".join(f"{x['final'] * 100:.1f}" for x in rs)
        mk = [x["sampled"]["overall"][f"mean@{k}"] for x in rs]
        pk = [x["sampled"]["overall"][f"pass@{k}"] for x in rs]
        t2 = [x["sampled"].get("addition/terms=2", {}).get(f"mean@{k}", float("nan")) for x in rs]
        t3 = [x["sampled"].get("addition/terms=3", {}).get(f"mean@{k}", float("nan")) for x in rs]
        L.append(f"| {METHOD_LABEL[m]} | {fmt_ms([x['final'] for x in rs])} | {per} | "
                 f"{fmt_ms([x['best'] for x in rs])} | {fmt_ms(mk)} | {fmt_ms(pk)} | {fmt_ms(t2)} | {fmt_ms(t3)} | "
                 f"{statistics.fmean(x['seconds'] for x in rs):.0f} |")
    L.append(f"| teacher (reference, not trained here) | {data['teacher_greedy'] * 100:.1f} | – | – | "
             f"{te['overall'][f'mean@{k}'] * 100:.1f} | {te['overall'][f'pass@{k}'] * 100:.1f} | "
             f"{sub(te, 'addition/terms=2')} | {sub(te, 'addition/terms=3')} | – |")
    L += ["", f"![held-out accuracy over steps]({png_path.name})", ""]

    L += ["## Diagnostics (from metrics.jsonl, mean over all steps and seeds)", ""]
    keys = [key for key in DIAGNOSTICS if any(runs[(m, s)]["diag"][key] is not None for m in r.methods for s in seeds)]
    L += ["| method | " + " | ".join(DIAGNOSTICS[key] for key in keys) + " |", "|---|" + "---:|" * len(keys)]
    for m in r.methods:
        cells = []
        for key in keys:
            vals = [runs[(m, s)]["diag"][key] for s in seeds if runs[(m, s)]["diag"][key] is not None]
            cells.append(f"{statistics.fmean(vals):.4f}" if vals else "–")
        L.append(f"| {m.upper()} | " + " | ".join(cells) + " |")
    L += ["", ("Fractions are of response tokens (clip/gate/clamp) or of prompt groups (zero-adv.). `gate blocked` "
          "= tokens whose policy gradient GRPO's ratio would pass but the TRRD ratio clips (selective imitation); "
          "`gate enabled` = the reverse. SFT has no rollouts, hence no RL diagnostics (its loss is plain NLL)."), ""]
    for para in diagnostics_text(data, r):
        L += [para, ""]

    L += ["## Settings", "", "Identical for every method (only `--algo` and the method's own knob differ):", "",
          (f"* RL steps {r.rl_iters}; {r.rollout_batch_size} prompts x {r.n_samples} samples per step (SFT: the same "
          f"{r.rollout_batch_size * r.n_samples} sequences per step); within a seed every method gets the same "
          f"{r.rl_iters * r.rollout_batch_size} training prompts (`--train-size`), each seen once (SFT: the teacher's "
          f"correct answers to them); rollout T=1, max {r.max_response_len} new tokens."),
          (f"* Adam lr {r.lr}, {r.lr_warmup_steps} warm-up optimizer steps, constant after; grad-clip 1.0; "
          f"micro-batch {r.micro_batch_size}; {r.num_updates} optimizer update(s) per rollout batch "
          f"(global batch {r.rollout_batch_size * r.n_samples // r.num_updates})."),
          ("* Clip eps 0.2 / 0.28 (the paper's K&K values), loss aggregation seq-mean-token-mean, no ref-KL, no "
          "entropy bonus, no dynamic sampling."),
          (f"* RLAD: alpha {r.alpha}, teacher log-ratio clamp 1 (App. B). KDRL: kl_coef {r.kl_coef}, k2 estimator "
          "(the paper does not report KDRL's coefficient). SFT: `--sft-source teacher`: the teacher samples "
          f"{r.n_samples} answers (T=1) for each of the same training prompts; correct ones are kept."),
          (f"* Layout: {r.nproc} CPU ranks, student TP=1 x DP={r.nproc}, teacher TP={r.teacher_tp} (gloo); rollouts "
          "from the in-process HF engine fed by the Megatron -> HF weight sync."),
          (f"* Seeds {', '.join(map(str, seeds))} (`--seed`: the training prompts, their order, rollout sampling; "
           "reasoning-gym item i of seed S comes from Random(S + i), so seeds at least "
           f"{r.rl_iters * r.rollout_batch_size} apart train on disjoint prompts). The pair is built once (seeded) "
           "and shared by all runs."), ""]
    L += ["### What was tuned", "", *TUNING_NOTES, ""]
    tuning = meta.get("tuning")
    if tuning:
        chosen = tuning["best_shared"]
        same = (chosen["lr"] == r.lr and chosen["num_updates"] == r.num_updates and tuning["best_kl_coef"] == r.kl_coef)
        L += [(f"Tuning results (`{meta['tuning_path']}`; {TUNE_BUDGET['rl_iters']} RL steps, seed 1, held-out eval "
              f"seed {TUNE_BUDGET['eval_seed']}, greedy accuracy on {r.eval_size} items):"), "", tuning_table(tuning),
              ("The settings above are the ones the rule picked." if same else
               "**Note: the settings of this run differ from the tuning rule's choice (overridden by flags).**"),
              ""]
        hashes = pair_hashes(Path(data["pair"]))
        L += [f"The tuning ran on a pair built by the same commands; weight hashes (sha256/16) there "
              f"{tuning['pair_sha256']}, here {hashes}: "
              + ("identical, the build is deterministic." if hashes == tuning["pair_sha256"] else "**they differ**."),
              "", "Tuning commands:", "", "```", *(c["command"] for c in tuning["commands"]), "```", ""]

    L += ["## Commands (in order; cwd = repository root)", "", "```"]
    for c in meta["commands"]:
        L.append(c["command"] + ("    # reused from an earlier run" if c.get("skipped") else ""))
    L += ["```", "", ("`rlad-eval` ran in the driver's process through the same entry point "
          "(`rlad_megatron.eval.main`)."), ""]
    mi = meta["machine"]
    n_reused = sum(bool(c.get("skipped")) for c in meta["commands"])
    L += ["## Machine and wall-clock", "",
          f"* `nproc`: {mi['nproc']}; CPU: {mi['cpu']}; Python {mi['python']}, torch {mi['torch']}.",
          f"* `uname -a`: `{mi['uname']}`",
          f"* load average at start: {mi['loadavg']} (the box is shared with other jobs; timings are pessimistic).",
          f"* wall-clock of the whole driver: {meta['wall_s'] / 60:.1f} min "
          f"(pair {meta['pair_s'] / 60:.1f} min, training runs {meta['train_s'] / 60:.1f} min, "
          f"sampled evals {meta['eval_s'] / 60:.1f} min)"
          + (f"; {n_reused} stage(s) were reused from an earlier invocation and are not included." if n_reused
             else "."), ""]
    text = "\n".join(L) + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)
    return text


TUNING_NOTES = [
    ("Nothing the paper fixes was tuned (alpha 0.5, clip 0.2/0.28, log-ratio clamp 1, group size 8). The knobs it "
     "leaves open were chosen with the short-run grid of `python -m rlad_megatron.reproduce --tune` (100 RL steps, "
     "1 seed, a separate tuning held-out set with eval seed 777, every method on the same grid): the shared lr in "
     "{1e-4, 3e-4} x optimizer updates per rollout batch in {1, 2}, then KDRL's kl_coef in {0.01, 0.1, 1.0} at the "
     "chosen setting. Rule (`choose_shared`): the lr with the best final accuracy averaged over all methods and "
     "update counts; then the larger number of updates per rollout, in which TRRD's trust region is active (with "
     "one update pi_S == pi_old and TRRD only reweights), unless fewer updates are better by more than 2 points "
     "averaged over methods. The 2-point tolerance was written down after the first pass of the grid had shown "
     "1 vs 2 updates within noise of each other; the lr and kl_coef choices are plain arg-max."),
]


def pair_hashes(pair: Path) -> dict[str, str]:
    """sha256 (first 16 hex digits) of the pair's weights: the same commands must give the same models."""
    import hashlib

    out = {}
    for name in ("teacher", "student"):
        h = hashlib.sha256()
        for f in sorted((pair / name).glob("*.safetensors")):
            h.update(f.read_bytes())
        out[name] = h.hexdigest()[:16]
    return out


def tuning_table(info: dict) -> str:
    lines = ["| lr | updates/rollout | kl_coef (KDRL) | method | final acc. (%) | eval curve (%) | zero-adv. groups |",
             "|---|---|---|---|---:|---|---:|"]
    for x in info["results"]:
        za = "–" if x["zero_adv"] is None else f"{x['zero_adv']:.2f}"
        lines.append(f"| {x['lr']:g} | {x['num_updates']} | {x['kl_coef']:g} | {x['method']} | {x['final'] * 100:.1f} | "
                     + " ".join(f"{v * 100:.0f}" for _, v in x["curve"]) + f" | {za} |")
    lines.append("")
    lines.append(f"Chosen: lr {info['best_shared']['lr']:g}, {info['best_shared']['num_updates']} update(s) per rollout, "
                 f"KDRL kl_coef {info['best_kl_coef']:g}.")
    return "\n".join(lines) + "\n"


