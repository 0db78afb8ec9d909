"""Multi-rank checks of `rlad_megatron.models` (builder, forward, teacher) on CPU/gloo, run by
tests/test_models.py as `torchrun --nproc_per_node=2 tests/dist/models_worker.py ROOT`, where ROOT holds
the tiny HF models written by the test (one subdir per name in `MODELS`). One launch, four layouts:

1. TP=1 (DP=2): the reference for every model: gathered logits, `compute_logprobs` (T=0.7 and 1.0, with
   entropy) and the full-batch gradient of the GRPO loss with an entropy bonus (`step.algos.micro_batch_loss` on
   the whole batch, plain autograd); the training path is `step.update.accumulate_gradients` (4 micro-batches,
   exact normalisation by global counts) under seq-mean-token-mean and token-mean;
   the frozen teacher beside the student (teacher TP=2 and PP=2 on its own groups);
2. TP=2: the same quantities, gradients gathered to HF-named full tensors; vocab padding masked;
   a dist checkpoint saved; `build_model` / `Layout` / teacher-layout errors;
3. PP=2 (1F1B): per-micro-batch metrics and gradients vs the PP=1 reference;
4. TP=1 again: the TP=2 checkpoint loaded, logits equal.

The worker only measures: it raises on unexpected errors, never on a tolerance. Rank 0 prints one
`RESULT {json}` line (floats: max over ranks, bools: all ranks, strings: first rank with one); the
thresholds live in tests/test_models.py.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

MODELS = ("qwen2_tied", "qwen3_untied")
ROWS, SEQ, MBS = 8, 16, 2
TEMPERATURES = (0.7, 1.0)
GRAD_TEMPERATURE = 0.7
AGGS = ("seq-mean-token-mean", "token-mean")
PACK_TOKENS = 40  # packs of 2-3 sequences of 13-16 tokens
# (aggregation, algo): the reference gradients computed once per model; packed runs cover rlad and kdrl
REFERENCES = [(AGGS[0], "grpo"), (AGGS[1], "grpo"), (AGGS[0], "rlad"), (AGGS[1], "kdrl")]

Value = float | bool | str | int
Grads = dict[str, torch.Tensor]


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(7))


def rollout_batch(tokens: torch.Tensor, old_logp: torch.Tensor):
    """A `RolloutBatch` of ROWS sequences of SEQ - (i % 4) tokens with responses of different lengths (prompts of
    2..7 tokens) and signed advantages; `old_logp` is fixed across layouts (the reference's log-probs shifted by
    0.1: every GRPO ratio is exp(0.1), unclipped, so every response token has a gradient), and so is the teacher's
    (shifted by 0.3, inside TRRD's clamp)."""
    from rlad_megatron.batch import RolloutBatch

    n, length = tokens.shape
    mask = torch.zeros(n, length - 1)
    for i in range(n):
        mask[i, 1 + i % 6:length - 1 - i % 4] = 1.0
    adv = torch.randn(n, generator=torch.Generator().manual_seed(8))
    return RolloutBatch(tokens=tokens, response_mask=mask, rollout_logp=torch.zeros(n, length - 1), rewards=adv,
                        advantages=adv, old_logp=old_logp, teacher_logp=old_logp - 0.2)


def loss_config(agg: str, algo: str = "grpo"):
    from rlad_megatron.step.algos import LossConfig

    return LossConfig(algo=algo, temperature=GRAD_TEMPERATURE, agg=agg, entropy_coef=0.05, kl_coef=0.1)


def loss_context(model):
    from rlad_megatron.step.algos import LossContext

    return LossContext(tp_group=model.pg.tp, vocab_size=model.spec.vocab_size)


def batch_loss(model, batch, agg: str, algo: str = "grpo") -> tuple[torch.Tensor, dict]:
    """`micro_batch_loss` of `batch` in one plain forward of the bare module (TP=1, PP=1), log-probs from the
    logits (the training path takes them fused from the hidden states: the comparison covers that op too)."""
    from rlad_megatron.models.forward import next_tokens, position_ids
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.step.algos import PolicyOutput, micro_batch_loss

    tokens = batch.tokens
    logits = model.module(tokens, position_ids(tokens), None)
    logp, ent = vocab_parallel_logprobs(logits, next_tokens(tokens), group=model.pg.tp,
                                        temperature=GRAD_TEMPERATURE, vocab_size=model.spec.vocab_size,
                                        with_entropy=True)
    cfg = loss_config(agg, algo)
    return micro_batch_loss(batch, PolicyOutput(logp[:, :-1], ent[:, :-1], logits), cfg, loss_context(model))


def load(name: str, root: Path, **build_kwargs):
    """A student-groups model (unless `pg=` is given) with the HF weights of `root/name`."""
    from rlad_megatron.convert import load_hf_into_megatron
    from rlad_megatron.models.builder import build_model
    from rlad_megatron.models.families import spec_from_hf_config

    model = build_model(spec_from_hf_config(root / name), **build_kwargs)
    load_hf_into_megatron(model, root / name)
    return model


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    if group.size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """`[b, s, padded_vocab]` logits gathered over TP (PP=1 models only), padding columns included."""
    from rlad_megatron.models.forward import position_ids

    assert model.pp == 1
    with torch.no_grad():
        local = model.module(tokens, position_ids(tokens), None)
    return gather_last_dim(local, model.pg.tp)


def output_weight(model) -> torch.nn.Parameter:
    """The parameter whose rows are the output logits on the last stage (the embedding when tied, PP=1)."""
    m = model.module
    return m.embedding.word_embeddings.weight if model.spec.tie_word_embeddings and model.pp == 1 \
        else m.output_layer.weight


def padded_rows(model) -> slice:
    """This TP rank's local rows of the output weight that are vocab padding."""
    local = model.padded_vocab // model.tp
    start = model.pg.tp.rank() * local
    return slice(min(max(model.spec.vocab_size - start, 0), local), local)


def grad_of(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient the optimizer sees: DDP's `main_grad` buffer when wrapped, else `.grad`."""
    return getattr(p, "main_grad", None) if hasattr(p, "main_grad") else p.grad


def hf_grads(model) -> Grads:
    """Gradients as full HF-named tensors: temporarily point every parameter's data at its gradient and run
    `export_hf_weights` (TP all-gather + layout merge, PP broadcast, vocab padding stripped)."""
    from rlad_megatron.convert import export_hf_weights

    saved = {}
    for name, p in model.module.named_parameters():
        saved[name] = p.data
        g = grad_of(p)
        p.data = g if g is not None else torch.zeros_like(p)
    try:
        return {k: v.detach().clone() for k, v in export_hf_weights(model)}
    finally:
        for name, p in model.module.named_parameters():
            p.data = saved[name]


def padding_grad(model) -> float:
    """max |gradient| of the padded vocab rows of the output weight (0.0 off the last stage)."""
    if not model.is_last_stage:
        return 0.0
    g = grad_of(output_weight(model))[padded_rows(model)]
    return float(g.abs().max()) if g.numel() else 0.0


def reference_backward(model, batch, agg: str, algo: str = "grpo") -> tuple[list[dict], Grads]:
    """The ground truth: the bare module at TP=1, PP=1, the gradient of the WHOLE batch's loss in one backward;
    per-micro-batch metrics from the same loss on each MBS-row slice."""
    assert model.tp == 1 and model.pp == 1
    model.module.zero_grad(set_to_none=True)
    loss, _ = batch_loss(model, batch, agg, algo)
    loss.backward()
    with torch.no_grad():
        metrics = [batch_loss(model, batch.select(slice(i, i + MBS)), agg, algo)[1] for i in range(0, len(batch), MBS)]
    return metrics, hf_grads(model)


def training_backward(model, batch, agg: str, algo: str = "grpo",
                      packed: bool = False) -> tuple[list[dict], Grads, float]:
    """The real training path: `build_optimizer`'s DDP module and `step.update.accumulate_gradients` (micro-batches
    of MBS rows, or with `packed` packs of at most PACK_TOKENS tokens balanced over the DP ranks; `run_schedule`,
    1F1B when PP>1; fused output-layer log-probs; exact loss normalisation). Returns (this rank's metrics, the
    HF-named gradients the optimizer would step on, max |padding-row grad|)."""
    from rlad_megatron.optim import build_optimizer
    from rlad_megatron.step.update import Policy, UpdateConfig, accumulate_gradients

    ddp_module, optimizer, scheduler = build_optimizer(model, lr=1e-3, clip_grad=0.0)
    policy = Policy(model, ddp_module, optimizer, scheduler)
    cfg = UpdateConfig(micro_batch_size=MBS, max_tokens_per_gpu=PACK_TOKENS if packed else None)
    metrics = accumulate_gradients(policy, batch, cfg, loss_config(agg, algo), loss_context(model),
                                   where="models_worker")
    return metrics, hf_grads(model), padding_grad(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max())


def grads_diff(got: Grads, ref: Grads) -> tuple[float, float]:
    """(max |diff| over every tensor, max over tensors of |diff|max / |ref|max); inf if the names differ."""
    if got.keys() != ref.keys():
        return float("inf"), float("inf")
    abs_d = max(max_diff(got[k], ref[k]) for k in ref)
    rel = max(max_diff(got[k], ref[k]) / max(float(ref[k].abs().max()), 1e-30) for k in ref)
    return abs_d, rel


def metrics_diff(got: list[dict], ref: list[dict], key: str) -> float:
    if len(got) != len(ref):
        return float("inf")
    return max(abs(float(g[key]) - float(r[key])) for g, r in zip(got, ref, strict=True))


def error_of(fn: Callable, *args, **kwargs) -> str:
    """The message of the exception `fn` raises (prefixed by its type), or 'NO ERROR'."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return "NO ERROR"


def main(root: Path) -> None:
    from rlad_megatron import platform
    from rlad_megatron.convert import (
        load_megatron_checkpoint,
        padded_vocab_for,
        read_megatron_meta,
        save_megatron_checkpoint,
    )
    from rlad_megatron.models import forward
    from rlad_megatron.models.builder import build_model
    from rlad_megatron.models.forward import compute_logprobs, split_rows
    from rlad_megatron.models.teacher import build_teacher, check_frozen

    platform.init(platform.Layout(1, 1))
    out: dict[str, Value] = {}
    tokens = {name: tokens_for(json.loads((root / name / "config.json").read_text())["vocab_size"])
              for name in MODELS}

    def scores(model, tok: torch.Tensor) -> dict[str, torch.Tensor]:
        res = {}
        for t in TEMPERATURES:
            res[f"logp_T{t}"], res[f"ent_T{t}"] = compute_logprobs(model, tok, temperature=t, micro_batch_size=MBS,
                                                                   with_entropy=True)
        return res

    def check_training(model, name: str, prefix: str, agg: str = AGGS[0], algo: str = "grpo",
                       packed: bool = False) -> None:
        """Gradients (and, unpacked, per-micro-batch metrics) of the training path vs the TP=1/PP=1 full-batch
        reference."""
        r = ref[name]
        metrics, grads, pad_grad = training_backward(model, rollout_batch(tokens[name], r["old_logp"]), agg, algo,
                                                     packed)
        key = f"{prefix}/{name}"
        out[f"{key}/grad"], out[f"{key}/grad_rel"] = grads_diff(grads, r["grads"][(agg, algo)])
        out[f"{key}/pad_grad"] = pad_grad
        if packed:
            if model.is_last_stage:
                out[f"{key}/packs"] = len(metrics)
            return
        if model.is_last_stage:
            ref_metrics = r["metrics"][(agg, algo)]
            mine = ref_metrics[split_rows(len(ref_metrics), model.pg.dp.size(), model.pg.dp.rank())]
            out[f"{key}/num_metrics"] = len(metrics) * model.pg.dp.size()
            out[f"{key}/loss"] = metrics_diff(metrics, mine, "loss")
            out[f"{key}/entropy_metric"] = metrics_diff(metrics, mine, "entropy")

    def check_packed(name: str, prefix: str) -> None:
        """`--use-dynamic-batch-size`: packs under the token budget, RLAD (seq-mean-token-mean) and KDRL
        (token-mean), vs the full-batch padded reference (a fresh model: the checks before stepped nothing, but
        DDP wrappers keep state)."""
        for agg, algo in REFERENCES[2:]:
            check_training(load(name, root), name, f"{prefix}_packed_{algo}", agg, algo, packed=True)

    # ---------------- 1. TP=1, PP=1 (DP=2): references; the teacher beside the student
    ref: dict[str, dict] = {}
    for name in MODELS:
        model = load(name, root)
        tok = tokens[name]
        r = {"logits": full_logits(model, tok)[..., :model.spec.vocab_size], **scores(model, tok)}
        r["old_logp"] = r[f"logp_T{GRAD_TEMPERATURE}"] - 0.1
        r["metrics"], r["grads"] = {}, {}
        for agg, algo in REFERENCES:
            r["metrics"][(agg, algo)], r["grads"][(agg, algo)] = reference_backward(
                model, rollout_batch(tok, r["old_logp"]), agg, algo)
        grads = r["grads"][(AGGS[0], "grpo")]
        out[f"ref/{name}/pad_grad"] = padding_grad(model)
        zero = [k for k, g in grads.items() if not g.abs().sum() > 0]
        out[f"ref/{name}/zero_grads"] = ",".join(zero)
        out[f"ref/{name}/grad_tensors"] = len(grads)
        out[f"ref/{name}/grad_scale"] = max(float(g.abs().max()) for g in grads.values())
        out[f"ref/{name}/logp_range"] = float(r["logp_T1.0"].max() - r["logp_T1.0"].min())
        out[f"ref/{name}/agg_grads_differ"] = grads_diff(r["grads"][("token-mean", "grpo")], grads)[1]
        ref[name] = r
        check_training(load(name, root), name, "dp")  # the training path at TP=1, DP=2
        check_training(load(name, root), name, "dp_token_mean", "token-mean")
        check_packed(name, "dp")

    name = "qwen2_tied"
    tok = tokens[name]
    student = load(name, root)
    student_logits = full_logits(student, tok)
    teacher = build_teacher(student.spec, tp=2)
    from rlad_megatron.convert import load_hf_into_megatron

    load_hf_into_megatron(teacher, root / name)
    out["teacher/tp"], out["teacher/dp"], out["teacher/student_tp"] = teacher.tp, teacher.pg.dp.size(), student.tp
    odd = tok[:5]  # not a multiple of the micro-batch size: exercises the row padding
    for t in TEMPERATURES:
        lp, ent = compute_logprobs(teacher, odd, temperature=t, micro_batch_size=MBS, with_entropy=True)
        out[f"teacher/tp2/logp_T{t}"] = max_diff(lp, ref[name][f"logp_T{t}"][:5])
        out[f"teacher/tp2/ent_T{t}"] = max_diff(ent, ref[name][f"ent_T{t}"][:5])
    out["teacher/check_frozen"] = error_of(check_frozen, teacher)
    out["teacher/no_grad_no_requires_grad"] = all(p.grad is None and not p.requires_grad
                                                  for p in teacher.module.parameters())
    # the student still runs at TP=1 in the same processes: same logits, and it trains (the teacher stays out)
    out["teacher/student_logits_after"] = max_diff(full_logits(student, tok), student_logits)
    _, grads = reference_backward(student, rollout_batch(tok, ref[name]["old_logp"]), AGGS[0])
    out["teacher/student_grad_after"] = grads_diff(grads, ref[name]["grads"][(AGGS[0], "grpo")])[0]
    out["teacher/no_grad_after_student_backward"] = all(p.grad is None for p in teacher.module.parameters())
    # check_frozen can fail: a trainable parameter, a gradient, training mode
    p0 = next(teacher.module.parameters())
    p0.requires_grad_(True)
    out["teacher/check_frozen_requires_grad"] = error_of(check_frozen, teacher)
    p0.requires_grad_(False)
    p0.grad = torch.zeros_like(p0)
    out["teacher/check_frozen_grad"] = error_of(check_frozen, teacher)
    p0.grad = None
    teacher.module.train()
    out["teacher/check_frozen_train"] = error_of(check_frozen, teacher)
    teacher.module.eval()
    del teacher
    teacher_pp = build_teacher(student.spec, tp=1, pp=2)
    load_hf_into_megatron(teacher_pp, root / name)
    out["teacher/pp2/pp"] = teacher_pp.pp
    for t in TEMPERATURES:
        lp, ent = compute_logprobs(teacher_pp, odd, temperature=t, micro_batch_size=MBS, with_entropy=True)
        out[f"teacher/pp2/logp_T{t}"] = max_diff(lp, ref[name][f"logp_T{t}"][:5])
        out[f"teacher/pp2/ent_T{t}"] = max_diff(ent, ref[name][f"ent_T{t}"][:5])
    out["teacher/pp2/check_frozen"] = error_of(check_frozen, teacher_pp)
    del teacher_pp, student

    def padding_check(model, model_name: str, tag: str) -> None:
        """Make the padded output rows large and random: log-probs/entropies must not move."""
        tok = tokens[model_name]
        before = scores(model, tok)
        w = output_weight(model)
        rows = padded_rows(model)
        with torch.no_grad():
            g = torch.Generator().manual_seed(11 + model.pg.tp.rank())
            w[rows] = 5.0 * torch.randn(w[rows].shape, generator=g)
        logits = full_logits(model, tok)
        vocab = model.spec.vocab_size
        out[f"pad/{model_name}/{tag}/pad_logit_max"] = float(logits[..., vocab:].abs().max())
        out[f"pad/{model_name}/{tag}/valid_logit_max"] = float(logits[..., :vocab].abs().max())
        out[f"pad/{model_name}/{tag}/padded_vocab"] = model.padded_vocab
        after = scores(model, tok)
        out[f"pad/{model_name}/{tag}/scores"] = max(max_diff(after[k], before[k]) for k in before)

    for model_name in MODELS:
        padding_check(load(model_name, root), model_name, "tp1")

    # ---------------- 2. TP=2 (DP=1)
    platform.initialize_parallel(platform.Layout(2, 1))
    platform.set_seed(1234)
    for model_name in MODELS:
        model = load(model_name, root)
        tok, r = tokens[model_name], ref[model_name]
        out[f"tp/{model_name}/tp"] = model.tp
        out[f"tp/{model_name}/logits"] = max_diff(full_logits(model, tok)[..., :model.spec.vocab_size], r["logits"])
        for k, v in scores(model, tok).items():
            out[f"tp/{model_name}/{k}"] = max_diff(v, r[k])
        check_training(model, model_name, "tp")
        check_packed(model_name, "tp")
        padding_check(model, model_name, "tp2")
        if model_name == "qwen3_untied":  # saved with non-zero padding rows: the reshard must carry them
            tp2_logits = full_logits(model, tok)
            save_megatron_checkpoint(model, root / "work" / "ckpt_tp2")

    spec = model.spec
    out["err/kv_heads"] = error_of(build_model, dataclasses.replace(spec, num_query_groups=1))
    out["err/heads"] = error_of(build_model, dataclasses.replace(spec, num_attention_heads=3, num_query_groups=1))
    out["err/layout"] = error_of(platform.initialize_parallel, platform.Layout(tp=3))
    out["err/cp"] = error_of(platform.init, platform.Layout(1, 1, cp=2))
    out["err/teacher_layout"] = error_of(build_teacher, spec, tp=2, pp=2)

    # ---------------- 3. PP=2 (DP=1), 1F1B
    platform.initialize_parallel(platform.Layout(1, 2))
    platform.set_seed(1234)
    calls = []
    real_1f1b = forward.forward_backward_pipelining_without_interleaving

    def counting_1f1b(*args, **kwargs):
        calls.append(kwargs["num_microbatches"])
        return real_1f1b(*args, **kwargs)

    forward.forward_backward_pipelining_without_interleaving = counting_1f1b
    try:
        for model_name in MODELS:
            model = load(model_name, root)
            tok, r = tokens[model_name], ref[model_name]
            out[f"pp/{model_name}/pp"] = model.pp
            calls.clear()
            check_training(model, model_name, "pp")
            check_packed(model_name, "pp")
            out[f"pp/{model_name}/1f1b_microbatches"] = calls[0] if calls else 0
            lp, _ = compute_logprobs(model, tok, temperature=1.0, micro_batch_size=MBS)
            out[f"pp/{model_name}/compute_logprobs"] = max_diff(lp, r["logp_T1.0"])
    finally:
        forward.forward_backward_pipelining_without_interleaving = real_1f1b

    # ---------------- 4. the TP=2 checkpoint loaded at TP=1 (DP=2)
    platform.initialize_parallel(platform.Layout(1, 1))
    platform.set_seed(1234)
    ckpt = root / "work" / "ckpt_tp2"
    meta = read_megatron_meta(ckpt)
    from rlad_megatron.models.families import spec_from_hf_config

    fresh = build_model(spec_from_hf_config(root / "qwen3_untied"), padded_vocab=padded_vocab_for(meta, 1))
    tok = tokens["qwen3_untied"]
    fresh_logits = full_logits(fresh, tok)
    load_megatron_checkpoint(fresh, ckpt)
    loaded = full_logits(fresh, tok)
    out["ckpt/meta_tp"], out["ckpt/padded_vocab"] = meta.tp, fresh.padded_vocab
    vocab = fresh.spec.vocab_size
    out["ckpt/logits"] = max_diff(loaded[..., :vocab], tp2_logits[..., :vocab])
    # the (deliberately non-zero) padding rows travel through the reshard too: relative diff of those columns
    out["ckpt/pad_logits_rel"] = max_diff(loaded[..., vocab:], tp2_logits[..., vocab:]) / float(
        tp2_logits[..., vocab:].abs().max())
    out["ckpt/changed_by_load"] = max_diff(loaded, fresh_logits)

    print_result(out)
    platform.shutdown()


def print_result(out: dict[str, Value]) -> None:
    """Rank 0 prints `RESULT {json}` of every rank's checks merged: booleans and-ed, floats max-ed, the first
    non-empty string kept (collective: every rank calls it)."""
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        merged: dict[str, Value] = {}
        for part in gathered:
            for k, v in part.items():
                if k not in merged:
                    merged[k] = v
                elif isinstance(v, bool):
                    merged[k] = merged[k] and v
                elif isinstance(v, float):
                    merged[k] = max(merged[k], v)
                elif isinstance(v, str) and not merged[k]:
                    merged[k] = v
        print("RESULT " + json.dumps(merged, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
