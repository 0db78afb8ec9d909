"""The step layer without a process group: the update's loss normalisation (micro-batch split and DP split give the
full-batch loss and gradient), the algorithm table and its fixes (entropy aggregation, dual clip everywhere, SFT at
T = 1), the prompt stream's order and resume position."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlad_megatron.batch import RolloutBatch
from rlad_megatron.data import PromptSample, PromptStream
from rlad_megatron.losses import kdrl_loss
from rlad_megatron.step.algos import ALGOS, LossConfig, LossContext, PolicyOutput, micro_batch_loss, token_advantages
from rlad_megatron.step.update import loss_count, make_loss_fn

VOCAB, LENGTH = 11, 9


def fake_model(dp: int) -> SimpleNamespace:
    """What `make_loss_fn` reads of a model: TP group (None = TP 1), DP size, true vocab."""
    return SimpleNamespace(pg=SimpleNamespace(tp=None, dp=SimpleNamespace(size=lambda: dp)),
                           spec=SimpleNamespace(vocab_size=VOCAB))


def make_batch(n: int = 6, seed: int = 0) -> RolloutBatch:
    """`n` sequences with responses of 1..n tokens at different offsets, signed advantages, old/teacher log-probs."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    mask = torch.zeros(n, LENGTH - 1)
    for i in range(n):
        start = 1 + i % 3
        mask[i, start:start + 1 + i] = 1.0
    adv = torch.randn(n, generator=g)
    return RolloutBatch(tokens=tokens, response_mask=mask, rollout_logp=-torch.rand(n, LENGTH - 1, generator=g),
                        rewards=adv, advantages=adv, old_logp=-torch.rand(n, LENGTH - 1, generator=g) - 1.5,
                        teacher_logp=-torch.rand(n, LENGTH - 1, generator=g) - 1.5)


def logits_for(batch: RolloutBatch, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(batch), LENGTH, VOCAB, generator=g, dtype=torch.float64).requires_grad_(True)


def full_loss(batch: RolloutBatch, logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The loss of the whole batch in one piece (what a single full-batch step optimises)."""
    loss_fn = make_loss_fn(fake_model(1), cfg, LossContext(), [], global_count=loss_count(batch, cfg.agg), n_micro=1)
    return loss_fn(batch, logits)[0]


def split_loss(batch: RolloutBatch, logits: torch.Tensor, cfg: LossConfig, split: list[list[int]]) -> torch.Tensor:
    """The update's path: `split[r]` are DP rank r's micro-batch sizes (uneven on purpose); each micro-batch loss is
    scaled by `make_loss_fn`, then divided by the rank's micro-batch count (Megatron's schedule) and averaged over
    the ranks (DDP)."""
    dp, total, row = len(split), 0.0, 0
    for sizes in split:
        loss_fn = make_loss_fn(fake_model(dp), cfg, LossContext(), errors := [],
                               global_count=loss_count(batch, cfg.agg), n_micro=len(sizes))
        for size in sizes:
            rows = slice(row, row + size)
            loss, _ = loss_fn(batch.select(rows), logits[rows])
            assert not errors, errors
            total = total + loss / len(sizes) / dp
            row += size
    return total


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("algo", ["grpo", "rlad", "kdrl"])
def test_micro_and_dp_split_give_the_full_batch_loss_and_gradient(agg, algo):
    batch = make_batch()
    cfg = LossConfig(algo=algo, temperature=0.7, agg=agg, entropy_coef=0.1, kl_coef=0.3)
    ref_logits, logits = logits_for(batch), logits_for(batch)
    ref = full_loss(batch, ref_logits, cfg)
    ref.backward()
    for split in ([[1] * 6], [[2, 1], [1, 2]], [[3], [1, 1, 1]]):
        logits.grad = None
        got = split_loss(batch, logits, cfg, split)
        got.backward()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("algo", ["grpo", "rlad", "kdrl", "sft"])
def test_fused_loss_from_hidden_states_equals_the_logits_path(agg, algo, monkeypatch):
    """The update's fused path (`ops.output_loss`: the loss differentiated in the forward pass, token chunks smaller
    than a micro-batch) gives the logits path's loss, metrics and gradients w.r.t. the hidden states and weight."""
    import functools

    from rlad_megatron.models import forward
    from rlad_megatron.ops.output_loss import output_loss

    monkeypatch.setattr(forward, "output_loss", functools.partial(output_loss, token_chunk=7, vocab_chunk=4))
    batch, hidden_size = make_batch(seed=3), 5
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(LENGTH, len(batch), hidden_size, generator=g, dtype=torch.float64)  # [s, b, h]
    weight = torch.randn(VOCAB, hidden_size, generator=g, dtype=torch.float64)
    cfg = LossConfig(algo=algo, temperature=0.7, agg=agg, entropy_coef=0.1, kl_coef=0.3)
    count = loss_count(batch, cfg.agg)
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        model = fake_model(1)
        model.module = SimpleNamespace(share_embeddings_and_output_weights=False, output_layer=SimpleNamespace(weight=w))
        model.config = SimpleNamespace(sequence_parallel=False)
        loss_fn = make_loss_fn(model, cfg, LossContext(), errors := [], global_count=count, n_micro=2, fused=fused)
        total, metrics = 0.0, []
        for rows in (slice(0, 4), slice(4, 6)):
            out = h[:, rows] if fused else (h[:, rows].transpose(0, 1) @ w.t())
            loss, m = loss_fn(batch.select(rows), out)
            assert not errors, errors
            total, metrics = total + loss / 2, metrics + [m]
        total.backward()
        results.append((total, metrics, h.grad, w.grad))
    (ref, ref_m, ref_dh, ref_dw), (got, got_m, dh, dw) = results
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-10, atol=1e-13)
    for a, b in zip(got_m, ref_m, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(b[k])) for k in a), (a, b)


def test_entropy_bonus_follows_the_loss_aggregation():
    """The entropy term is aggregated like the policy loss: seq-mean-token-mean weights each sequence equally."""
    batch = make_batch()
    logits = logits_for(batch)
    cfg = LossConfig(algo="grpo", agg="seq-mean-token-mean", entropy_coef=1.0)
    from rlad_megatron.ops.logprobs import vocab_parallel_logprobs

    logp, ent = vocab_parallel_logprobs(logits, torch.cat([batch.tokens[:, 1:], batch.tokens[:, :1]], 1),
                                        temperature=1.0, with_entropy=True)
    out = PolicyOutput(logp=logp[:, :-1], entropy=ent[:, :-1])
    with_bonus, m = micro_batch_loss(batch, out, cfg, LossContext())
    without, _ = micro_batch_loss(batch, out, LossConfig(algo="grpo", agg="seq-mean-token-mean"), LossContext())
    mask = batch.response_mask > 0
    per_seq = (ent[:, :-1] * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(without - with_bonus, per_seq.mean())
    assert abs(m["entropy"] - float(per_seq.mean())) < 1e-12
    token_mean = float((ent[:, :-1] * mask).sum() / mask.sum())
    assert abs(token_mean - float(per_seq.mean())) > 1e-3, "the two aggregations must differ on this batch"


def test_dual_clip_reaches_every_ppo_term():
    """A < 0 with ratio e^2 > c = 3: the dual clip caps every token's loss at -c A = 3|A| in grpo, in kdrl and in
    gkd's RL term."""
    batch = make_batch()
    batch.advantages = -batch.advantages.abs()
    g = torch.Generator().manual_seed(5)
    logits, teacher = (torch.randn(len(batch), LENGTH, VOCAB, generator=g, dtype=torch.float64) for _ in range(2))
    out = PolicyOutput(logp=batch.old_logp + 2.0, entropy=torch.zeros_like(batch.old_logp), logits=logits)
    ctx = LossContext(teacher_logits=lambda tokens: teacher)
    capped_pg = 3.0 * float(batch.advantages.abs().mean())  # seq-mean-token-mean of 3|A_i|
    losses = {}
    for algo, extra in (("grpo", {}), ("kdrl", {}), ("gkd", {"gkd_rl_coef": 1.0})):
        plain, _ = micro_batch_loss(batch, out, LossConfig(algo=algo, **extra), ctx)
        capped, m = micro_batch_loss(batch, out, LossConfig(algo=algo, dual_clip=3.0, **extra), ctx)
        frac = m["rl/dual_clip_frac"] if algo == "gkd" else m["dual_clip_frac"]
        assert frac == 1.0 and float(capped) < float(plain), algo
        losses[algo] = (float(plain), float(capped))
    assert losses["grpo"][1] == pytest.approx(capped_pg, rel=1e-6)  # fp32 batch tensors
    for algo in ("kdrl", "gkd"):  # the non-PPO term (KL) is untouched: the whole difference is the capped surrogate
        assert losses[algo][0] - losses[algo][1] == pytest.approx(losses["grpo"][0] - capped_pg, rel=1e-5), algo
    ref, _ = kdrl_loss(out.logp, batch.old_logp, batch.teacher_logp, token_advantages(batch, LossConfig("kdrl")),
                       batch.response_mask, kl_coef=1e-3, dual_clip=3.0)
    assert losses["kdrl"][1] == pytest.approx(float(ref), rel=1e-6)


def test_sft_nll_is_taken_at_temperature_one():
    batch = make_batch()
    logits = logits_for(batch)
    cfg = LossConfig(algo="sft", temperature=0.5, agg="token-mean")
    assert cfg.policy_temperature == 1.0 and LossConfig(algo="rlad", temperature=0.5).policy_temperature == 0.5
    loss = full_loss(batch, logits, cfg)
    logp = torch.log_softmax(logits.detach(), -1)[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
    mask = batch.response_mask > 0
    torch.testing.assert_close(loss.detach(), -(logp[mask]).mean())


def test_the_algorithm_table():
    assert sorted(ALGOS) == ["gkd", "grpo", "kdrl", "rlad", "sft"]
    assert [a for a in ALGOS if ALGOS[a].teacher_logp] == ["rlad", "kdrl"]
    assert ALGOS["gkd"].teacher_logits and not ALGOS["sft"].rl
    assert ALGOS["sft"].needs_teacher("teacher") and not ALGOS["sft"].needs_teacher("dataset")
    assert not ALGOS["grpo"].needs_teacher()


def test_kl_estimator_k1_is_refused_by_the_flags():
    from rlad_megatron.arguments import parse_args

    base = ["--student-hf", "s", "--teacher-hf", "t", "--prompt-data", "builtin:addition"]
    with pytest.raises(ValueError, match="k1 cannot drive a KL loss term"):
        parse_args([*base, "--algo", "kdrl", "--kl-estimator", "k1"])
    with pytest.raises(ValueError, match="k1 cannot drive a KL loss term"):
        parse_args([*base, "--algo", "grpo", "--ref-kl-coef", "0.1", "--kl-estimator", "k1"])
    assert parse_args([*base, "--algo", "grpo", "--kl-estimator", "k1"]).kl_estimator == "k1"  # no KL term: unused


def test_prompt_stream_order_and_resume_position():
    samples = [PromptSample(prompt=f"p{i}", answer=str(i), task="t") for i in range(7)]
    one_go = PromptStream(samples, seed=3).next_batch(20)
    stream = PromptStream(samples, seed=3)
    chunked = [s for _ in range(5) for s in stream.next_batch(4)]
    assert chunked == one_go and stream.position == 20
    resumed = PromptStream(samples, seed=3, position=9)
    assert resumed.next_batch(11) == one_go[9:]
    epochs = [sorted(s.prompt for s in one_go[e * 7:(e + 1) * 7]) for e in range(2)]
    assert epochs[0] == epochs[1] == sorted(s.prompt for s in samples), "each epoch is a permutation"
    assert one_go[:7] != one_go[7:14], "each epoch is shuffled anew"
    assert PromptStream(samples, seed=4).next_batch(20) != one_go
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], seed=0)


def test_a_released_engine_is_always_pushed_again(monkeypatch):
    """The weight-release contract of `step.sync`: after `release_engines` the engine holds no weights (SGLang drops
    them without a CPU backup), so the next sync pushes even when the student has not changed."""
    from rlad_megatron.step import sync
    from rlad_megatron.step.configs import SyncConfig
    from rlad_megatron.step.run import RunState

    pushes, releases = [], []
    engine = SimpleNamespace(mode="colocated", resume_memory=lambda tags: None,
                             release_memory=lambda tags: releases.append(tuple(tags)))
    run = SimpleNamespace(engine_holds=None, offloader=None, engine=engine, sync=SyncConfig(), state=RunState(step=3))
    monkeypatch.setattr(sync, "push", lambda run, model, label: pushes.append(label) or {})
    sync.sync_weights(run)
    sync.sync_weights(run)  # holds step3 already: no push
    assert pushes == ["step3"] and run.engine_holds == "step3"
    sync.release_engines(run)
    assert releases == [("weights", "kv_cache", "cuda_graph")] and run.engine_holds is None
    sync.sync_weights(run)  # same student, but the weights were released
    assert pushes == ["step3", "step3"]
    run.engine.mode = "remote"  # remote engines keep their weights
    sync.release_engines(run)
    assert run.engine_holds == "step3" and len(releases) == 1
