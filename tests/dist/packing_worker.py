"""Multi-rank checks of the fused output-layer log-prob and of packed micro-batches on CPU/gloo, run by
tests/test_packing_dist.py as `torchrun --nproc_per_node=2 tests/dist/packing_worker.py ROOT` (ROOT holds the
tiny HF models of tests/test_models.py, one subdir per name in `models_worker.MODELS`). One launch:

A. `ops.output_logprobs` at TP=2 (the world group) vs the logits path (`x @ W_local^T` + `vocab_parallel_logprobs`):
   values, entropy, gradients w.r.t. hidden (all-reduced) and weight; fp32/fp64, padded vocab (including a rank
   that holds only padding), T=0.7, several tilings; logits near 1e4 vs fp64; bf16 vs fp64. `ops.output_loss`
   (a clipped-ratio loss + entropy bonus differentiated in the forward pass) vs the same loss on the logits path.
B. Models, lengths drawn long-tailed: the padded TP=1 `compute_logprobs` (logits path) is the reference for
   * `score_packed` (fused and logits) and `compute_logprobs(fused=True)` at TP=1 x DP=2, TP=2 and PP=2;
   * the gradients of a token-mean and a seq-mean-token-mean loss run packed (fused path, `build_optimizer`'s
     DDP module, `packing.loss_scale`) at each layout vs the padded single-replica logits-path reference.

Rank 0 prints one `RESULT {json}` line (floats: max over ranks, bools: all ranks, others: first rank).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from models_worker import MODELS, error_of, grads_diff, hf_grads, load, max_diff, print_result

TEMPERATURE = 0.7
N_SEQ, MAX_LEN, BUDGET, MBS = 14, 40, 46, 2  # BUDGET 46: 3 and 2 packs on the two DP=2 ranks
Value = float | bool | str | int


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (0 for empty tensors, inf on a shape mismatch)."""
    return max_diff(a, b) if a.numel() or a.shape != b.shape else 0.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (inf on a shape mismatch)."""
    return max_diff(a, b) / max(float(b.abs().max()), 1e-30) if a.shape == b.shape else float("inf")


# ------------------------------------------------------------------ A. the op at TP=2


def full_weight_grad(w: torch.Tensor, group) -> torch.Tensor:
    """The `[vocab, h]` gradient of a vocab-sharded weight: every rank's `w.grad`, gathered in rank order (fp64)."""
    parts = [torch.empty_like(w.grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, w.grad.contiguous(), group=group)
    return torch.cat(parts).double()


def op_checks(out: dict[str, Value]) -> None:
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.ops.output_logprobs import output_logprobs

    group, rank = dist.group.WORLD, dist.get_rank()
    n, h, local = 45, 24, 40  # padded vocab 80

    def run(fn, x, w_full, dtype, reduce_dx=False, **kw):
        """(logp, ent, grad hidden, full weight grad) of sum(g1 logp + g2 ent) at TP=2. The logits path's hidden
        gradient is all-reduced here, as ColumnParallelLinear's backward does (the fused op does it itself)."""
        x = x.detach().to(dtype).clone().requires_grad_()
        w = w_full[rank * local:(rank + 1) * local].to(dtype).clone().requires_grad_()
        lp, ent = fn(x, w, **kw)
        g = torch.Generator().manual_seed(5)
        g1, g2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
        g1[:3] = 0.0
        g2[:3] = 0.0  # rows nobody differentiates
        (lp * g1.to(lp.dtype) + ent * g2.to(lp.dtype)).sum().backward()
        if reduce_dx:
            dist.all_reduce(x.grad, group=group)
        return lp.double(), ent.double(), x.grad.double(), full_weight_grad(w, group)

    def fused(x, w, **kw):
        return output_logprobs(x, w, targets, group=group, temperature=TEMPERATURE, with_entropy=True, **kw)

    def logits_path(x, w, vocab_size):
        return vocab_parallel_logprobs(x @ w.t(), targets, group=group, temperature=TEMPERATURE,
                                       vocab_size=vocab_size, with_entropy=True)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w_full = 0.6 * torch.randn(2 * local, h, generator=g, dtype=torch.float64)
    for vocab in (73, 31):  # rank 1 holds 33 real rows + padding / only padding
        targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(vocab))
        out[f"op/v{vocab}/rank1_owns_targets"] = bool((targets >= local).any()) or vocab <= local
        for dtype, tag in ((torch.float64, "fp64"), (torch.float32, "fp32")):
            ref = run(logits_path, x, w_full, dtype, reduce_dx=True, vocab_size=vocab)
            for tiles in ((4096, 4096), (8, 7), (45, 1)):
                got = run(fused, x, w_full, dtype, vocab_size=vocab, token_chunk=tiles[0], vocab_chunk=tiles[1])
                for name, a, b in zip(("logp", "ent", "dx", "dw"), got, ref, strict=True):
                    key = f"op/v{vocab}/{tag}/{name}"
                    out[key] = max(out.get(key, 0.0), rel(a, b))
                out[f"op/v{vocab}/{tag}/pad_grad"] = float(got[3][vocab:].abs().max()) if vocab < 2 * local else 0.0
    # logits near 1e4 computed exactly in fp32 (integer hidden/weights): only the softmax math differs from fp64
    xi = torch.randint(-2, 3, (n, h), generator=g).double()
    wi = torch.randint(-3, 4, (2 * local, h), generator=g).double()
    xi[:, 0], wi[:, 0] = 1e4, 1.0
    targets = torch.randint(0, 2 * local, (n,), generator=g)

    def fused_t1(x, w, **kw):
        return output_logprobs(x, w, targets, group=group, with_entropy=True, token_chunk=16, vocab_chunk=16)

    def logits_t1(x, w):
        return vocab_parallel_logprobs(x @ w.t(), targets, group=group, with_entropy=True)

    ref = run(logits_t1, xi, wi, torch.float64, reduce_dx=True)
    out["op/big/logit_min"] = float((xi @ wi.t()).min())
    for name, fn in (("fused", fused_t1), ("logits", logits_t1)):
        got = run(fn, xi, wi, torch.float32, reduce_dx=fn is logits_t1)
        for key, a, b in zip(("logp", "ent", "dx", "dw"), got, ref, strict=True):
            out[f"op/big/{name}/{key}"] = rel(a, b)
    # bf16 inputs: fp32 math per tile; vs the fp64 result of the same (bf16-rounded) inputs
    targets = torch.randint(0, 73, (n,), generator=torch.Generator().manual_seed(73))
    ref = run(fused, x.to(torch.bfloat16), w_full.to(torch.bfloat16), torch.float64, vocab_size=73)
    got = run(fused, x, w_full, torch.bfloat16, vocab_size=73, token_chunk=16, vocab_chunk=16)
    for key, a, b in zip(("logp", "ent", "dx", "dw"), got, ref, strict=True):
        out[f"op/bf16/{key}"] = rel(a, b)
    loss_checks(out, x, w_full, local)
    out["op/err/dtype"] = error_of(output_logprobs, x.float(), w_full.double(), targets)
    out["op/err/targets"] = error_of(output_logprobs, x.float(), w_full[:local].float(), targets + 200, group=group,
                                     vocab_size=73)


def loss_checks(out: dict[str, Value], x: torch.Tensor, w_full: torch.Tensor, local: int) -> None:
    """`ops.output_loss` at TP=2: a clipped-ratio loss with an entropy bonus, differentiated in the forward pass,
    vs the same loss on the logits path (value and gradients; several token chunks)."""
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.ops.output_loss import output_loss

    group, rank, n = dist.group.WORLD, dist.get_rank(), x.shape[0]
    g = torch.Generator().manual_seed(9)
    old, adv = torch.randn(n, generator=g, dtype=torch.float64) - 2.0, torch.randn(n, generator=g, dtype=torch.float64)
    adv[:3] = 0.0

    def ratio_loss(lp, ent):
        ratio, a = torch.exp(lp - old.to(lp.dtype)), adv.to(lp.dtype)
        return (-torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)).sum() - 0.05 * ent.sum(), None

    def run(fused: bool, dtype, vocab, targets, **tiles):
        xs = x.detach().to(dtype).clone().requires_grad_()
        w = w_full[rank * local:(rank + 1) * local].to(dtype).clone().requires_grad_()
        if fused:
            loss, *_ = output_loss(xs, w, targets, ratio_loss, group=group, temperature=TEMPERATURE,
                                   vocab_size=vocab, with_entropy=True, **tiles)
        else:
            lp, ent = vocab_parallel_logprobs(xs @ w.t(), targets, group=group, temperature=TEMPERATURE,
                                              vocab_size=vocab, with_entropy=True)
            loss, _ = ratio_loss(lp, ent)
        loss.backward()
        if not fused:
            dist.all_reduce(xs.grad, group=group)
        return loss.detach().double().reshape(1), xs.grad.double(), full_weight_grad(w, group)

    for vocab in (73, 31):
        targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(vocab))
        for dtype, tag in ((torch.float64, "fp64"), (torch.float32, "fp32")):
            ref = run(False, dtype, vocab, targets)
            for tiles in ((1024, 4096), (8, 7), (45, 1)):
                got = run(True, dtype, vocab, targets, token_chunk=tiles[0], vocab_chunk=tiles[1])
                for name, a, b in zip(("loss", "dx", "dw"), got, ref, strict=True):
                    key = f"loss/v{vocab}/{tag}/{name}"
                    out[key] = max(out.get(key, 0.0), rel(a, b))


# ------------------------------------------------------------------ B. models


def draw_sequences(vocab: int) -> list[torch.Tensor]:
    """Long-tailed lengths (lognormal, capped) in [2, MAX_LEN], one length-1 sequence (no predictions)."""
    g = torch.Generator().manual_seed(21)
    lengths = (math.log(10.0) + 0.7 * torch.randn(N_SEQ, generator=g)).exp().round().clamp(2, MAX_LEN)
    lengths = [int(n) for n in lengths]
    lengths[3] = 1
    lengths[5] = MAX_LEN
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def padded(seqs: list[torch.Tensor]) -> torch.Tensor:
    tok = torch.zeros(len(seqs), max(s.numel() for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        tok[i, :s.numel()] = s
    return tok


def loss_inputs(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sequence advantage and a prediction-aligned `[N, L-1]` response mask (the last part of each)."""
    g = torch.Generator().manual_seed(9)
    n, width = len(seqs), max(s.numel() for s in seqs) - 1
    mask = torch.zeros(n, width)
    for i, s in enumerate(seqs):
        p = s.numel() - 1
        mask[i, p // 3:p] = 1.0
    return {"adv": torch.randn(n, generator=g), "mask": mask}


def denominators(inputs: dict, agg: str) -> tuple[torch.Tensor, float]:
    """(per-token weight `[N, L-1]`, global denominator) of the aggregation."""
    mask = inputs["mask"]
    if agg == "token-mean":
        return mask, float(mask.sum())
    counts = mask.sum(1, keepdim=True)
    has = counts[:, 0] > 0
    return torch.where(counts > 0, mask / counts.clamp(min=1), 0.0), float(has.sum())


@dataclass
class PaddedBatch:
    """A padded reference micro-batch: `tokens [b, L]`, per-token loss weights `[b, L-1]`, advantages `[b]`."""

    tokens: torch.Tensor
    weight: torch.Tensor
    adv: torch.Tensor


def reference_grads(model, seqs: list[torch.Tensor], inputs: dict, agg: str):
    """Padded rows, logits path, bare module, every micro-batch on this rank (TP=1, PP=1: nothing to sync)."""
    from rlad_megatron.models.forward import run_schedule
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs
    from rlad_megatron.packing import loss_scale

    weight, denom = denominators(inputs, agg)
    tok = padded(seqs)
    micro = [PaddedBatch(tok[i:i + MBS], weight[i:i + MBS], inputs["adv"][i:i + MBS]) for i in range(0, len(seqs), MBS)]
    scale = loss_scale(len(micro), 1, denom)

    def loss_fn(mb, logits):
        logp, ent = vocab_parallel_logprobs(logits[:, :-1], mb.tokens[:, 1:], group=model.pg.tp,
                                            temperature=TEMPERATURE, vocab_size=model.spec.vocab_size,
                                            with_entropy=True)
        loss_sum = (mb.weight * (-mb.adv[:, None] * logp - 0.05 * ent)).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach().clone()}

    model.module.zero_grad(set_to_none=True)
    metrics = run_schedule(model, model.module, micro, loss_fn, forward_only=False)
    return sum(float(m["loss_sum"]) for m in metrics), hf_grads(model)


def packed_grads(model, seqs: list[torch.Tensor], inputs: dict, agg: str):
    """Packs of this DP rank (fused path, DDP module, 1F1B when PP>1), normalised by `packing.loss_scale`.
    Returns (the global loss sum, HF-named gradients, this rank's micro-batch count)."""
    from rlad_megatron.models.forward import logprobs_from_hidden, run_schedule
    from rlad_megatron.models.packed import packed_micro_batches
    from rlad_megatron.optim import build_optimizer
    from rlad_megatron.packing import loss_scale

    weight, denom = denominators(inputs, agg)
    dp = model.pg.dp.size()
    micro = packed_micro_batches(model, seqs, max_tokens_per_gpu=BUDGET)
    scale = loss_scale(len(micro), dp, denom)

    def loss_fn(mb, hidden):
        logp, ent = logprobs_from_hidden(model, hidden, mb.targets, temperature=TEMPERATURE, with_entropy=True)
        loss_sum = (mb.per_token(weight) * (-mb.per_seq(inputs["adv"]) * logp - 0.05 * ent)).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach().clone()}

    ddp_module, optimizer, _ = build_optimizer(model, lr=1e-3, clip_grad=0.0)
    ddp_module.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = run_schedule(model, ddp_module, micro, loss_fn, forward_only=False, output="hidden")
    mine = model.is_last_stage and model.pg.tp.rank() == 0  # count each DP rank's packs once
    local = torch.tensor([sum(float(m["loss_sum"]) for m in metrics) if mine else 0.0], dtype=torch.float64)
    dist.all_reduce(local)
    return float(local), hf_grads(model), len(micro)


def model_checks(out: dict[str, Value], root: Path, prefix: str, ref: dict) -> None:
    """Packed scoring and training at the current global layout vs the padded TP=1 reference `ref`."""
    from rlad_megatron.models.forward import compute_logprobs
    from rlad_megatron.models.packed import score_packed

    for name in MODELS:
        model = load(name, root)
        seqs, r = ref[name]["seqs"], ref[name]
        key = f"{prefix}/{name}"
        out[f"{key}/layout"] = f"tp{model.tp}pp{model.pp}dp{model.pg.dp.size()}"
        for fused in (True, False):
            tag = "fused" if fused else "logits"
            lp, ent = score_packed(model, seqs, max_tokens_per_gpu=BUDGET, temperature=TEMPERATURE,
                                   with_entropy=True, fused=fused)
            for k, got in (("logp", lp), ("ent", ent)):  # max |diff| over all tokens, and / max |reference|
                diff = max(abs_diff(got[i], r[k][i, :s.numel() - 1]) for i, s in enumerate(seqs))
                scale = max(float(r[k][i, :s.numel() - 1].abs().max()) for i, s in enumerate(seqs) if s.numel() > 1)
                out[f"{key}/packed_{tag}/{k}_abs"] = diff
                out[f"{key}/packed_{tag}/{k}"] = diff / scale
            out[f"{key}/packed_{tag}/empty_ok"] = lp[3].numel() == 0
        lp, ent = compute_logprobs(model, padded(seqs), temperature=TEMPERATURE, micro_batch_size=MBS,
                                   with_entropy=True, fused=True)
        out[f"{key}/padded_fused/logp"] = rel(lp, r["logp"])
        out[f"{key}/padded_fused/ent"] = rel(ent, r["ent"])
        for agg in ("token-mean", "seq-mean-token-mean"):
            loss, grads, n_micro = packed_grads(load(name, root), seqs, r["inputs"], agg)
            ref_loss, ref_grads = r[agg]
            out[f"{key}/{agg}/loss"] = abs(loss - ref_loss) / abs(ref_loss)
            out[f"{key}/{agg}/grad_rel"] = grads_diff(grads, ref_grads)[1]
            out[f"{key}/n_micro_rank{dist.get_rank()}"] = n_micro


def pipeline_pack_shapes(root: Path, ref: dict) -> list[int]:
    """Token counts of this rank's packs (PP=2 exchanges shapes: they must differ for the check to mean it)."""
    from rlad_megatron.packing import plan_micro_batches

    seqs = ref[MODELS[0]]["seqs"]
    lengths = [s.numel() for s in seqs]
    return sorted({sum(lengths[i] for i in ids) for ids in plan_micro_batches(lengths, 1, BUDGET)[0]})


def main(root: Path) -> None:
    from rlad_megatron import platform
    from rlad_megatron.models.forward import compute_logprobs

    platform.init(platform.Layout(1, 1))
    out: dict[str, Value] = {}
    op_checks(out)

    # references: padded, logits path, TP=1, every sequence on every rank
    ref: dict[str, dict] = {}
    for name in MODELS:
        model = load(name, root)
        seqs = draw_sequences(model.spec.vocab_size)
        logp, ent = compute_logprobs(model, padded(seqs), temperature=TEMPERATURE, micro_batch_size=MBS,
                                     with_entropy=True)
        inputs = loss_inputs(seqs)
        ref[name] = {"seqs": seqs, "logp": logp, "ent": ent, "inputs": inputs}
        for agg in ("token-mean", "seq-mean-token-mean"):
            ref[name][agg] = reference_grads(model, seqs, inputs, agg)
        out[f"ref/{name}/logp_range"] = float(logp.max() - logp.min())
        out[f"ref/{name}/lengths"] = ",".join(str(s.numel()) for s in seqs)

    model_checks(out, root, "dp2", ref)
    platform.initialize_parallel(platform.Layout(2, 1))
    platform.set_seed(1234)
    model_checks(out, root, "tp2", ref)
    platform.initialize_parallel(platform.Layout(1, 2))
    platform.set_seed(1234)
    out["pp2/pack_tokens"] = ",".join(map(str, pipeline_pack_shapes(root, ref)))
    model_checks(out, root, "pp2", ref)

    print_result(out)
    platform.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
