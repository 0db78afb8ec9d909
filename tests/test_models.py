"""Model equivalence across layouts (the foundation acceptance tests), one 2-rank torchrun launch of
tests/dist/models_worker.py shared by every test here:

* TP=2 vs TP=1: gathered logits, `compute_logprobs` log-probs/entropies (T=0.7, 1.0), and the gradients of a
  log-prob loss run through `run_schedule`, gathered to full HF-named tensors;
* PP=2 (1F1B, 4 micro-batches) vs PP=1: per-micro-batch metrics and gradients;
* a frozen teacher (TP=2, and PP=2) on its own groups beside a TP=1 (DP=2) student;
* vocab padding: large random padded output rows leave log-probs unchanged;
* a model-only dist checkpoint saved at TP=2 and loaded at TP=1.

The models are tiny random Qwen2 (tied) / Qwen3 (untied) with 300 tokens (padded to 384 at TP=1 and 512 at
TP=2: the second TP rank holds real tokens and padding), with weights redrawn at O(0.1-1) so that every
comparison moves visibly when wrong.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_torchrun

pytestmark = pytest.mark.slow  # torchrun / subprocess runs

WORKER = ROOT / "tests" / "dist" / "models_worker.py"

_spec = importlib.util.spec_from_file_location("models_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# 300 tokens: padded to 384 at TP=1 and 512 at TP=2, where both ranks hold real tokens and padding
VOCAB = 300
EQUAL = 1e-5  # "equal" for logits and log-probs in fp32
BITWISE = 1e-6  # PP=2 vs PP=1 is bit-identical per docs/research; leave a hair of slack


def make_hf_model(out: Path, arch: str, tie: bool, seed: int) -> Path:
    """A tiny random HF model (`rlad_megatron.tiny`'s "test" shape) with VOCAB tokens, weights redrawn at a
    scale where logits spread over several nats (HF's init_std=0.02 makes every distribution almost
    uniform, which hides errors)."""
    from transformers import AutoModelForCausalLM

    from rlad_megatron.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("test", arch=arch, vocab_size=VOCAB, tie=tie),
                                             dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else noise * (0.5 if "bias" in name else 0.15))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    for seed, (name, arch, tie) in enumerate((("qwen2_tied", "qwen2", True), ("qwen3_untied", "qwen3", False))):
        assert name in worker.MODELS
        make_hf_model(root / name, arch, tie, seed)
    out = run_torchrun(WORKER, root, nproc=2, timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("name", worker.MODELS)
def test_reference_is_informative(results, name):
    """The TP=1 reference has spread-out log-probs and a non-zero gradient for every HF tensor."""
    assert results[f"ref/{name}/logp_range"] > 3.0
    # at TP=2 (512 padded columns, 256 per rank) both ranks own some target tokens
    targets = worker.tokens_for(VOCAB)[:, 1:]
    assert (targets < 256).any() and (targets >= 256).any()
    assert results[f"ref/{name}/grad_tensors"] >= 12
    assert results[f"ref/{name}/zero_grads"] == "", "tensors with an all-zero gradient"
    assert results[f"ref/{name}/pad_grad"] == 0.0, "padded vocab rows got a gradient at TP=1"


def assert_training_grads(results: dict, prefix: str, name: str, tol: float) -> None:
    """The training path (`step.update.accumulate_gradients`: DDP, micro-batches split over DP, `run_schedule`) at
    `prefix`'s layout: the per-micro-batch metrics and every HF-named full gradient the optimizer would step on
    equal the TP=1/PP=1 reference, which is ONE backward of the whole batch's loss."""
    r = {k.removeprefix(f"{prefix}/{name}/"): v for k, v in results.items() if k.startswith(f"{prefix}/{name}/")}
    assert r["num_metrics"] == 4, r
    assert r["loss"] < tol and r["entropy_metric"] < tol, r
    assert r["pad_grad"] == 0.0, "padded vocab rows got a gradient"
    assert r["grad"] < tol * max(1.0, results[f"ref/{name}/grad_scale"]), r
    assert r["grad_rel"] < 10 * tol, r


@pytest.mark.parametrize("name", worker.MODELS)
def test_tp2_matches_tp1(results, name):
    r = {k.removeprefix(f"tp/{name}/"): v for k, v in results.items() if k.startswith(f"tp/{name}/")}
    assert r["tp"] == 2
    assert r["logits"] < EQUAL, r
    for t in worker.TEMPERATURES:
        assert r[f"logp_T{t}"] < EQUAL and r[f"ent_T{t}"] < EQUAL, (t, r)
    assert_training_grads(results, "tp", name, EQUAL)


@pytest.mark.parametrize("name", worker.MODELS)
def test_dp2_gradients_match_one_replica(results, name):
    """TP=1 with the 4 micro-batches split over 2 data-parallel replicas: the GRPO + entropy loss under
    seq-mean-token-mean (responses of different lengths) gives exactly the full-batch gradient."""
    assert_training_grads(results, "dp", name, EQUAL)


@pytest.mark.parametrize("name", worker.MODELS)
def test_dp2_token_mean_gradients_match_one_replica(results, name):
    """The same with token-mean: micro-batch losses rescaled by their share of the global token count."""
    assert results[f"ref/{name}/agg_grads_differ"] > 1e-3, "the two aggregations must give different gradients"
    assert_training_grads(results, "dp_token_mean", name, EQUAL)


@pytest.mark.parametrize("name", worker.MODELS)
def test_pp2_matches_pp1(results, name):
    r = {k.removeprefix(f"pp/{name}/"): v for k, v in results.items() if k.startswith(f"pp/{name}/")}
    assert r["pp"] == 2
    assert r["1f1b_microbatches"] == 4, "run_schedule did not use the 1F1B schedule with 4 micro-batches"
    assert_training_grads(results, "pp", name, BITWISE)
    assert r["compute_logprobs"] < EQUAL, r


def test_teacher_beside_student(results):
    r = {k.removeprefix("teacher/"): v for k, v in results.items() if k.startswith("teacher/")}
    assert (r["tp"], r["dp"], r["student_tp"], r["pp2/pp"]) == (2, 1, 1, 2), r
    for t in worker.TEMPERATURES:
        for layout in ("tp2", "pp2"):
            assert r[f"{layout}/logp_T{t}"] < EQUAL and r[f"{layout}/ent_T{t}"] < EQUAL, (layout, t, r)
    assert r["check_frozen"] == "NO ERROR" and r["pp2/check_frozen"] == "NO ERROR", r
    assert r["no_grad_no_requires_grad"] and r["no_grad_after_student_backward"], r
    assert r["student_logits_after"] == 0.0, "the student's forward changed after building the teacher"
    assert r["student_grad_after"] < EQUAL, r
    # check_frozen itself catches each way of being unfrozen
    assert r["check_frozen_requires_grad"].startswith("RuntimeError: teacher parameters must be frozen"), r
    assert r["check_frozen_grad"].startswith("RuntimeError: teacher parameters must be frozen"), r
    assert r["check_frozen_train"] == "RuntimeError: teacher is in training mode", r


@pytest.mark.parametrize("tag", ["tp1", "tp2"])
@pytest.mark.parametrize("name", worker.MODELS)
def test_vocab_padding_is_masked(results, name, tag):
    r = {k.removeprefix(f"pad/{name}/{tag}/"): v for k, v in results.items() if k.startswith(f"pad/{name}/{tag}/")}
    assert r["padded_vocab"] == {"tp1": 384, "tp2": 512}[tag]
    # the perturbed padding columns dominate the raw logits, yet log-probs and entropies do not move
    assert r["pad_logit_max"] > 2 * r["valid_logit_max"], r
    assert r["scores"] == 0.0, r


def test_checkpoint_reshard_tp2_to_tp1(results):
    assert results["ckpt/meta_tp"] == 2 and results["ckpt/padded_vocab"] == 512
    assert results["ckpt/logits"] < EQUAL, results["ckpt/logits"]
    assert results["ckpt/pad_logits_rel"] < 1e-6, results["ckpt/pad_logits_rel"]
    assert results["ckpt/changed_by_load"] > 1.0, "loading did not change the freshly built model"


@pytest.mark.parametrize(("key", "message"), [
    ("err/kv_heads", "ValueError: num_key_value_heads=1 is not divisible by tensor-model-parallel size 2"),
    ("err/heads", "ValueError: num_attention_heads=3 is not divisible by tensor-model-parallel size 2"),
    ("err/layout", "ValueError: world size 2 is not divisible by TP*PP*CP = 3*1*1"),
    ("err/cp", "ValueError: --context-parallel-size > 1 needs CUDA"),
    ("err/teacher_layout", "ValueError: teacher TP*PP = 2*2 does not divide the world size 2"),
])
def test_layout_errors_in_process_group(results, key, message):
    assert results[key].startswith(message), results[key]
