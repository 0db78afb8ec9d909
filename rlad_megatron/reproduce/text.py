"""The report's prose, computed from its numbers: the TRRD-vs-GRPO table, the reading, the settings list."""

from __future__ import annotations

import math
import statistics

from rlad_megatron.reproduce.recipe import KNOB, Recipe


def diagnostics_rows(diag: dict | None, finals: dict) -> list[str]:
    """The weight-difference table (pooled over RLAD's final runs) beside the gated fractions by advantage sign."""
    if diag is None:
        return ["No RLAD run with a non-zero GRPO weight was logged."]
    g = diag["gates"]
    rel = " / ".join("–" if x is None else f"{x:.3f}" for x in diag["per_seed"])
    alpha = finals["rlad"]["setting"].knob_value
    return [
        ("Per token, either loss's gradient is `sum_t w_t dlogp_t/dtheta` with `w_t = -dL/dlogp_t = k_t A_t r_t s_t u_t` "
        "(`k_t` the aggregation weight, `s_t` = 1 for GRPO and `alpha + (1 - alpha) 1[|log pi_S/pi_T| <= c]` for TRRD, "
        "`u_t` = 1 on the unclipped branch). Both weights are computed at the same tokens in every micro-batch "
        "(`rlad_megatron/losses/trrd_vs_grpo.py`) and pooled over all steps and seeds as "
        "`sqrt(sum ||w_TRRD - w_GRPO||^2 / sum ||w_GRPO||^2)`."), "",
        f"| RLAD (alpha {alpha:g}) | all tokens | A > 0 | A < 0 |", "|---|---:|---:|---:|",
        (f"| relative norm of the weight difference | {diag.get('rel_diff', float('nan')):.3f} | "
        f"{diag.get('rel_diff_pos', float('nan')):.3f} | {diag.get('rel_diff_neg', float('nan')):.3f} |"),
        (f"| gated: GRPO passes a gradient, TRRD does not (% of tokens) | – | {g.get('blocked_pos', 0) * 100:.2f} | "
        f"{g.get('blocked_neg', 0) * 100:.2f} |"),
        (f"| gated: TRRD passes a gradient, GRPO does not (% of tokens) | – | {g.get('enabled_pos', 0) * 100:.2f} | "
        f"{g.get('enabled_neg', 0) * 100:.2f} |"), "",
        (f"Cosine between the two weight vectors {diag.get('cosine', float('nan')):.3f}; teacher log-ratio at the clamp "
        f"on {diag['clamp'] * 100:.1f}% of tokens; mean TRRD ratio {diag['ratio_mean']:.3f}; relative difference per "
        f"seed {rel}.")]


def thresholds(alpha: float, eps_low: float, eps_high: float, clamp: float) -> tuple[float | None, float | None]:
    """At pi_S = pi_old, log r = (1 - alpha) clamp(log pi_S/pi_T): the pi_S/pi_T above which an A > 0 token, and below
    which an A < 0 token, loses its gradient (None when the clamp keeps r inside the clip range)."""
    up, down = math.log1p(eps_high) / (1 - alpha), math.log(1 - eps_low) / (1 - alpha)
    return (math.exp(up) if up < clamp else None), (math.exp(down) if -down < clamp else None)


def verdict(name: str, c: dict) -> str:
    if c["lo"] is None:
        return f"{name}: {c['mean'] * 100:+.1f} points from one seed; no interval, nothing established."
    ci = f"{c['mean'] * 100:+.1f} points, 95% CI [{c['lo'] * 100:+.1f}, {c['hi'] * 100:+.1f}]"
    if c["lo"] > 0:
        return f"{name} = {ci}: established, the first is higher on this task and budget."
    if c["hi"] < 0:
        return f"{name} = {ci}: established, the first is lower on this task and budget."
    return f"{name} = {ci}: not established (the interval contains 0)."


def reading(data: dict, comps: dict, diag: dict | None, teacher_g: float, student_g: float) -> list[str]:
    r, finals, params = data["recipe"], data["finals"], data["params"]
    means = {m: statistics.fmean(x["final"] for x in f["runs"]) for m, f in finals.items()}
    before = finals[r.methods[0]]["runs"][0]["before"]
    se = math.sqrt(max(before, 0.01) * (1 - min(before, 0.99)) / r.eval_size)
    gap = teacher_g >= 0.9 and student_g <= 0.5 and params["teacher"] > params["student"]
    out = [(f"{'The setting has' if gap else 'The setting does NOT have'} the capacity gap asked for (a teacher at "
            f">= 90% greedy held-out accuracy, a smaller student at <= 50%): the teacher ({params['teacher']:,} "
            f"parameters, {params['teacher'] / params['student']:.1f}x the student) reaches {teacher_g * 100:.1f}%, "
            f"the student starts at {student_g * 100:.1f}%."),
           "Ranking by mean final greedy accuracy: " + " > ".join(
               f"{m.upper()} {means[m] * 100:.1f}%" for m in sorted(means, key=lambda m: -means[m]))
           + f" (student before RL {before * 100:.1f}%; one eval of {r.eval_size} prompts has a binomial standard "
           f"error of about {se * 100:.1f} points there)."]
    out += [verdict(f"{a.upper()} − {b.upper()}", c) for (a, b), c in comps.items()]
    chosen = {m: f["setting"] for m, f in finals.items()}
    out.append("The tuning rule chose " + "; ".join(
        f"{m.upper()} lr {s.lr:g}, {s.num_updates} update(s) per rollout"
        + ("" if KNOB[m][0] == "lr" else f", {KNOB[m][0]} {s.knob_value:g}") for m, s in chosen.items()) + ".")
    if diag is not None and "rlad" in chosen:
        alpha = chosen["rlad"].knob_value
        up, down = thresholds(alpha, 0.2, 0.28, 1.0)
        g = diag["gates"]
        blocked = g.get("blocked_pos", 0) + g.get("blocked_neg", 0)
        out.append(
            f"TRRD is not GRPO plus a reweighting in the first update: with pi_S = pi_old its ratio is "
            f"(pi_old/pi_T)^{1 - alpha:g}, and the clip acts on it"
            + (f" (an A > 0 token gets no gradient once pi_S/pi_T > {up:.3f}" if up else " (A > 0: never, the clamp")
            + (f", an A < 0 token once pi_S/pi_T < {down:.3f})." if down else "; A < 0: never).")
            + f" Here {blocked * 100:.2f}% of tokens lost the gradient GRPO would have given them and "
            f"{(g.get('enabled_pos', 0) + g.get('enabled_neg', 0)) * 100:.2f}% gained one.")
        rel = diag.get("rel_diff", float("nan"))
        out.append(
            f"Measured on the same tokens, RLAD's per-token gradient weights differ from GRPO's by {rel * 100:.1f}% of "
            f"GRPO's norm (A > 0: {diag.get('rel_diff_pos', float('nan')) * 100:.1f}%, A < 0: "
            f"{diag.get('rel_diff_neg', float('nan')) * 100:.1f}%; cosine {diag.get('cosine', float('nan')):.3f}), while "
            f"only {blocked * 100:.2f}% of tokens are gated: most of the difference is the rescaling by "
            "(pi_S/pi_T)^(1-alpha) and the clamp, not the gate."
            if blocked < 0.05 else
            f"Measured on the same tokens, RLAD's per-token gradient weights differ from GRPO's by {rel * 100:.1f}% of "
            f"GRPO's norm (cosine {diag.get('cosine', float('nan')):.3f}), with {blocked * 100:.2f}% of tokens gated.")
    return out


def settings_lines(r: Recipe) -> list[str]:
    return [
        (f"* RL: {r.rollout_batch_size} prompts x {r.n_samples} samples per step (SFT distillation: the same "
        f"{r.rollout_batch_size * r.n_samples} sequences per step from the teacher's correct answers, T=1), rollout "
        f"T=1, max {r.max_response_len} new tokens, micro-batch {r.micro_batch_size}, Adam, {r.lr_warmup_steps} "
        "warm-up steps then constant lr, grad-clip 1.0; clip eps 0.2 / 0.28, loss aggregation seq-mean-token-mean, "
        "teacher log-ratio clamp 1 (RLAD), k2 KL estimator (KDRL, GRPO's ref-KL), no entropy bonus."),
        (f"* Every run is one CPU rank (student TP=1, teacher colocated in the same process), {r.lanes} runs side by "
        "side; rollouts from the in-process HF engine fed by the Megatron -> HF weight sync."),
        ("* Generator seeds of the stages are 1e7 apart (teacher SFT 1e7, student SFT 2e7, tuning 1e8, finals "
        "1.1e8-1.5e8): reasoning-gym builds item i of seed S from Random(S + i), so closer seeds reuse items."),
        ("* Why this task: knights_knaves prompts are 400-580 characters (vs 16 here), have no reasoning traces to "
        "build a teacher by SFT, and a >= 90% teacher from nothing is out of reach of this CPU budget; 4-digit "
        "addition of 2-3 terms has an item space of 1e8-1e12 and traces to train on (the pair table above "
        "says how strong each model got).")]
