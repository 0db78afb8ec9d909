"""HFEngine: sampling log-probs vs an independent forward, stopping, seeding, padding, scoring, weight sessions."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rlad_megatron.rollout.base import RolloutEngine, SamplingParams, WeightUpdateError
from rlad_megatron.rollout.hf_engine import HFEngine

torch.set_num_threads(1)
VOCAB = 256
TOL = 1e-4


def tiny_config(**kw) -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)


def random_model(seed: int, **kw) -> Qwen2ForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(tiny_config(**kw)).eval()


def make_prompts(n: int, seed: int, lo: int = 2, hi: int = 13) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]


@torch.no_grad()
def ref_logits(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Unpadded full forward -> logits [len(output), V] predicting each output token."""
    seq = torch.tensor([prompt + output])
    return model(seq).logits[0, len(prompt) - 1 : -1].float()


def ref_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    lp = torch.log_softmax(ref_logits(model, prompt, output) / temperature, -1)
    return lp.gather(-1, torch.tensor(output)[:, None])[:, 0]


def max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max().item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    random_model(1).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def engine(model_dir) -> HFEngine:
    return HFEngine(model_dir)


@pytest.fixture(scope="module")
def ref(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == "default" and engine.weight_dtype == torch.float32 and engine.health()


def test_dummy_weights_are_seeded():
    def weights(seed):
        return [p.clone() for p in HFEngine(tiny_config(), seed=seed).model.parameters()]

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c) if x.std() > 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (20, 0.9)])
def test_generate_logprobs_match_forward(engine, ref, temperature, top_k, top_p):
    prompts = make_prompts(8, seed=3)
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, ignore_eos=True, seed=7)
    outs = engine.generate(prompts, sp)
    assert [o.prompt_ids for o in outs] == prompts
    for p, o in zip(prompts, outs):
        assert len(o.output_ids) == len(o.output_logprobs) == 12 and o.finish_reason == "length"
        assert o.weight_version == "default" and o.meta["completion_tokens"] == 12
        # pre-filter, temperature-scaled log-probs (SGLang's convention), not the filtered distribution
        assert max_diff(o.output_logprobs, ref_logprobs(ref, p, o.output_ids, temperature)) < TOL


def test_greedy_is_argmax_with_raw_logprobs(engine, ref):
    prompts = make_prompts(6, seed=4)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    for p, o in zip(prompts, outs):
        logits = ref_logits(ref, p, o.output_ids)
        assert o.output_ids == logits.argmax(-1).tolist()
        assert max_diff(o.output_logprobs, ref_logprobs(ref, p, o.output_ids, 1.0)) < TOL


def test_top_k_one_and_tiny_top_p_are_greedy(engine, ref):
    prompts = make_prompts(4, seed=5)
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    for sp in (SamplingParams(temperature=0.7, top_k=1, max_new_tokens=8, ignore_eos=True, seed=1),
               SamplingParams(temperature=0.7, top_p=1e-6, max_new_tokens=8, ignore_eos=True, seed=1)):
        outs = engine.generate(prompts, sp)
        assert [o.output_ids for o in outs] == [g.output_ids for g in greedy]
        for p, o in zip(prompts, outs):  # still log_softmax(logits / 0.7), not 0 = log(1) of the filtered dist
            assert max_diff(o.output_logprobs, ref_logprobs(ref, p, o.output_ids, 0.7)) < TOL


def test_samples_stay_in_filtered_support(engine, ref):
    prompts = make_prompts(16, seed=6)
    temp = 2.0  # flat distribution: filtering is what keeps samples in the support
    for top_k, top_p in ((5, 1.0), (-1, 0.3)):
        sp = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, max_new_tokens=16, ignore_eos=True, seed=2)
        for p, o in zip(prompts, engine.generate(prompts, sp)):
            probs = torch.softmax(ref_logits(ref, p, o.output_ids) / temp, -1)
            sorted_p, order = probs.sort(-1, descending=True)
            rank = (order == torch.tensor(o.output_ids)[:, None]).float().argmax(-1)
            if top_k != -1:
                assert (rank < top_k).all()
            mass_before = (sorted_p.cumsum(-1) - sorted_p).gather(-1, rank[:, None])[:, 0]
            assert (mass_before <= top_p + 1e-5).all()


@pytest.mark.parametrize("top_k", [-1, 8])
def test_sampling_follows_the_distribution(engine, ref, top_k):
    """Empirical frequencies of 4000 one-token samples match softmax(logits / T), renormalised over the top-k.

    T is low because a random model's logits are nearly flat: at T=0.05 the perplexity is ~20, so the sampling
    noise in total variation is ~0.02, while sampling at T=0.07 instead is off by > 0.13 (uniform: > 0.7).
    """
    prompt = make_prompts(1, seed=8)[0]
    temp, n = 0.05, 4000
    outs = engine.generate([prompt] * n, SamplingParams(temperature=temp, top_k=top_k, max_new_tokens=1, seed=0))
    counts = torch.bincount(torch.tensor([o.output_ids[0] for o in outs]), minlength=VOCAB).float()
    probs = torch.softmax(ref_logits(ref, prompt, [0])[0] / temp, -1)
    if top_k != -1:
        probs[probs.argsort(descending=True)[top_k:]] = 0.0
        probs /= probs.sum()
    assert 0.5 * (counts / n - probs).abs().sum() < 0.06


def test_stop_token_ids_eos_and_ignore_eos(engine, ref, model_dir):
    prompts = make_prompts(5, seed=9)
    base = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    stop = base[0].output_ids[3]
    k = base[0].output_ids.index(stop)
    expect = [b.output_ids[: b.output_ids.index(stop) + 1] if stop in b.output_ids else b.output_ids for b in base]

    def check(outs, stops: bool):
        for e, b, o in zip(expect, base, outs):
            ids = e if stops else b.output_ids
            assert o.output_ids == ids and max_diff(o.output_logprobs, b.output_logprobs[: len(ids)]) < TOL
            hit = stops and stop in ids
            assert o.finish_reason == ("stop" if hit else "length") and o.meta["matched"] == (stop if hit else None)

    greedy = {"temperature": 0.0, "max_new_tokens": 10}
    out = engine.generate(prompts, SamplingParams(**greedy, stop_token_ids=(stop,)))
    assert out[0].output_ids == base[0].output_ids[: k + 1]  # the stop token is included
    check(out, stops=True)
    eos_engine = HFEngine(model_dir, eos_token_ids=[stop])
    check(eos_engine.generate(prompts, SamplingParams(**greedy)), stops=True)
    check(eos_engine.generate(prompts, SamplingParams(**greedy, ignore_eos=True)), stops=False)
    check(eos_engine.generate(prompts, SamplingParams(**greedy, ignore_eos=True, stop_token_ids=[stop])), stops=True)


def test_max_new_tokens_zero_and_errors(engine):
    outs = engine.generate([[1, 2], [3]], SamplingParams(max_new_tokens=0))
    assert [(o.output_ids, o.output_logprobs, o.finish_reason) for o in outs] == [([], [], "length")] * 2
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([[1]], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=0)


def test_seeded_determinism(engine):
    prompts = make_prompts(6, seed=10)
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=123)
    a, b = engine.generate(prompts, sp), engine.generate(prompts, sp)
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert [o.output_logprobs for o in a] == [o.output_logprobs for o in b]
    c = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=124))
    assert [o.output_ids for o in a] != [o.output_ids for o in c]
    dup = engine.generate([prompts[0]] * 4, sp)  # GRPO-style repeats must not collapse to one sample
    assert len({tuple(o.output_ids) for o in dup}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_left_padding_matches_one_by_one(engine, temperature):
    prompts = make_prompts(6, seed=11, lo=1, hi=20)
    greedy = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True))[0]
    stop = greedy.output_ids[4]  # row 0 stops early at T=0, so finished rows are dropped from the batch
    sp = {"temperature": temperature, "max_new_tokens": 16, "stop_token_ids": (stop,)}
    batch = engine.generate(prompts, SamplingParams(**sp, seed=21))
    for i, (p, o) in enumerate(zip(prompts, batch)):
        single = engine.generate([p], SamplingParams(**sp, seed=21 + i))[0]
        assert single.output_ids == o.output_ids and single.finish_reason == o.finish_reason
        assert max_diff(single.output_logprobs, o.output_logprobs) < 1e-5
    if temperature == 0.0:
        assert batch[0].finish_reason == "stop"


def test_stop_strings_with_tokenizer(model_dir):
    t = Tokenizer(models.WordLevel(vocab={chr(0x100 + i): i for i in range(VOCAB)}, unk_token=chr(0x100)))
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    eng = HFEngine(model_dir, tokenizer=tok)
    prompt = make_prompts(1, seed=12)[0]
    base = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))[0]
    assert base.text == tok.decode(base.output_ids) and len(base.text) == 12
    stop = tok.decode(base.output_ids[3:5])
    k = next(j for j in range(12) if stop in tok.decode(base.output_ids[: j + 1]))
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12, stop=(stop,)))[0]
    assert out.output_ids == base.output_ids[: k + 1] and out.finish_reason == "stop" and out.meta["matched"] == stop
    assert out.text == tok.decode(out.output_ids)[: k - 1]  # the stop string is trimmed from the text


@pytest.mark.parametrize("temperature", [1.0, 0.8, 0.0])
def test_score_matches_forward(engine, ref, temperature):
    seqs = make_prompts(5, seed=13, lo=3, hi=15)
    plens = [max(1, len(s) // 2) for s in seqs]
    got = engine.score(seqs, plens, temperature=temperature)
    for s, p, g in zip(seqs, plens, got):
        assert len(g) == len(s) - p
        assert max_diff(g, ref_logprobs(ref, s[:p], s[p:], temperature or 1.0)) < TOL
    with pytest.raises(ValueError, match="prompt_len"):
        engine.score([[1, 2]], [0])


# ---------------------------------------------------------------- weight-update sessions
@pytest.fixture
def dummy() -> HFEngine:
    return HFEngine(tiny_config(), seed=0)


def full_update(engine: HFEngine, model, version: str) -> None:
    engine.begin_weight_update()
    engine.update_weights(list(model.named_parameters()))
    engine.end_weight_update(version)


def test_update_then_outputs_follow_new_weights(dummy):
    other = random_model(2)
    seqs = make_prompts(4, seed=14, lo=4, hi=12)
    before = dummy.score(seqs, [2] * 4)
    full_update(dummy, other, "step-1")
    after = dummy.score(seqs, [2] * 4)
    for s, b, a in zip(seqs, before, after):
        expect = ref_logprobs(other, s[:2], s[2:], 1.0)
        assert max_diff(a, expect) < TOL and max_diff(b, expect) > 1e-2
    outs = dummy.generate(seqs, SamplingParams(max_new_tokens=4, seed=0, ignore_eos=True))
    assert dummy.weight_version == "step-1" and all(o.weight_version == "step-1" for o in outs)
    for s, o in zip(seqs, outs):
        assert max_diff(o.output_logprobs, ref_logprobs(other, s, o.output_ids, 1.0)) < TOL


def test_update_outside_session_raises(dummy):
    params = list(random_model(2).named_parameters())
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        dummy.update_weights(params[:1])
    with pytest.raises(WeightUpdateError, match="without begin"):
        dummy.end_weight_update("v")
    full_update(dummy, random_model(2), "v1")
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        dummy.update_weights(params[:1])


def test_bad_names_and_shapes_name_the_tensor_and_write_nothing(dummy):
    good_name, good = "model.norm.weight", torch.full((64,), 3.0)
    before = dummy.model.get_parameter(good_name).clone()
    dummy.begin_weight_update()
    with pytest.raises(WeightUpdateError, match=r"unknown parameter 'model\.layers\.9\.mlp\.up_proj\.weight'"):
        dummy.update_weights([(good_name, good), ("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(WeightUpdateError, match=r"shape mismatch for 'model\.embed_tokens\.weight'.*\(256, 32\)"):
        dummy.update_weights([(good_name, good), ("model.embed_tokens.weight", torch.zeros(256, 32))])
    with pytest.raises(WeightUpdateError, match="model.norm.weight"):
        dummy.update_weights([(good_name, torch.ones(64, dtype=torch.int64))])
    assert torch.equal(dummy.model.get_parameter(good_name), before)  # the bucket was rejected as a whole
    with pytest.raises(RuntimeError, match="session is open"):
        dummy.generate([[1, 2]], SamplingParams(max_new_tokens=2))


def test_missing_tensors_raise_at_end_and_block_generation(dummy):
    params = list(random_model(2).named_parameters())
    skipped = ["model.layers.1.self_attn.k_proj.bias", "lm_head.weight"]
    dummy.begin_weight_update()
    dummy.update_weights([(n, t) for n, t in params if n not in skipped])
    with pytest.raises(WeightUpdateError, match="not updated") as err:
        dummy.end_weight_update("v1")
    assert all(n in str(err.value) for n in skipped)
    assert not dummy.health() and dummy.weight_version == "default"
    with pytest.raises(WeightUpdateError, match="partially"):
        dummy.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    full_update(dummy, random_model(2), "v2")  # a complete session repairs the engine
    assert dummy.health() and dummy.weight_version == "v2"


def test_empty_session_keeps_previous_weights_usable(dummy):
    dummy.begin_weight_update()
    with pytest.raises(WeightUpdateError, match="not updated"):
        dummy.end_weight_update("v1")
    assert dummy.health() and dummy.weight_version == "default"


def test_tied_embeddings(tmp_path):
    tied = random_model(3, tie_word_embeddings=True)
    eng = HFEngine(tiny_config(tie_word_embeddings=True), seed=0)
    assert "lm_head.weight" not in dict(eng.model.named_parameters())
    state = dict(tied.state_dict())
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    full_update(eng, tied, "no-alias")  # canonical names only
    seq = make_prompts(1, seed=15, lo=6)[0]
    assert max_diff(eng.score([seq], [2])[0], ref_logprobs(tied, seq[:2], seq[2:], 1.0)) < TOL
    eng.begin_weight_update()  # the tied alias sent before its canonical tensor: checked at the end
    eng.update_weights([("lm_head.weight", state["lm_head.weight"])] + list(tied.named_parameters()))
    eng.end_weight_update("with-alias")
    eng.begin_weight_update()
    eng.update_weights(list(tied.named_parameters()) + [("lm_head.weight", state["lm_head.weight"] + 1.0)])
    with pytest.raises(WeightUpdateError, match=r"'lm_head\.weight' is tied to 'model\.embed_tokens\.weight'"):
        eng.end_weight_update("untied")
    assert eng.weight_version == "with-alias"


def test_memory_calls_and_shutdown(dummy):
    dummy.release_memory(["weights", "kv_cache", "cuda_graph"])
    dummy.resume_memory(["weights"])
    dummy.flush_cache()
    with pytest.raises(ValueError, match="unknown memory tags"):
        dummy.release_memory(["weigths"])
    assert dummy.health()
    dummy.shutdown()
    dummy.shutdown()
    assert not dummy.health()
    with pytest.raises(RuntimeError, match="shut down"):
        dummy.generate([[1]], SamplingParams(max_new_tokens=1))
    with pytest.raises(WeightUpdateError, match="shut down"):
        dummy.begin_weight_update()


def test_bf16_engine_logprobs(model_dir):
    eng = HFEngine(model_dir, dtype=torch.bfloat16)
    ref16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompts = make_prompts(3, seed=16)
    for p, o in zip(prompts, eng.generate(prompts, SamplingParams(max_new_tokens=6, seed=0, ignore_eos=True))):
        assert max_diff(o.output_logprobs, ref_logprobs(ref16, p, o.output_ids, 1.0)) < 0.05
