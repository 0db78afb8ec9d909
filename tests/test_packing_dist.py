"""Fused output-layer log-probs and packed micro-batches across layouts: one 2-rank torchrun launch of
tests/dist/packing_worker.py (~80 s on the 2-core CPU box) shared by every test here.

* `ops.output_logprobs` and `ops.output_loss` at TP=2 == logits + `vocab_parallel_logprobs` (values, entropy, gradients w.r.t. hidden
  and weight), padded vocab (one rank holding only padding), T=0.7, several tilings; logits near 1e4 vs fp64;
* packed (block-diagonal mask, one row per micro-batch) vs padded per-token log-probs and entropies of tiny
  Qwen2 (tied) / Qwen3 (untied) models at TP=1 x DP=2, TP=2 and PP=2 (packs of different lengths through 1F1B);
* packed training gradients (fused path, DDP, `packing.loss_scale`, DP ranks with different micro-batch counts)
  == the padded single-replica logits-path reference, for token-mean and seq-mean-token-mean.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_torchrun
from tests.test_models import make_hf_model

WORKER = ROOT / "tests" / "dist" / "packing_worker.py"
MODELS = ("qwen2_tied", "qwen3_untied")
LAYOUTS = {"dp2": "tp1pp1dp2", "tp2": "tp2pp1dp1", "pp2": "tp1pp2dp1"}
# fp32 log-probs of magnitude ~10 carry ~1e-6 of rounding (1 ulp at 8-16): "equal" is relative to the largest
REL = 1e-6
GRAD_REL = 5e-6  # max |g - g_ref| / max |g_ref| per tensor, after packing/DP/TP/PP reorder every sum

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("packing")
    for seed, (name, arch, tie) in enumerate((("qwen2_tied", "qwen2", True), ("qwen3_untied", "qwen3", False))):
        make_hf_model(root / name, arch, tie, seed)
    out = run_torchrun(WORKER, root, nproc=2, timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, out
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.parametrize("vocab", [73, 31])
def test_fused_op_matches_logits_path_tp2(results, vocab):
    """73: rank 1 holds 33 real rows + 7 padding; 31: rank 1 holds only padding."""
    r = {k.removeprefix(f"op/v{vocab}/"): v for k, v in results.items() if k.startswith(f"op/v{vocab}/")}
    for name in ("logp", "ent", "dx", "dw"):
        assert r[f"fp64/{name}"] < 1e-12, (name, r)
        assert r[f"fp32/{name}"] < 2e-6, (name, r)
    assert r["fp32/pad_grad"] == 0.0 and r["fp64/pad_grad"] == 0.0, r


@pytest.mark.parametrize("vocab", [73, 31])
def test_fused_loss_matches_logits_path_tp2(results, vocab):
    """`ops.output_loss` at TP=2 (the loss differentiated in the forward pass) == the same loss on the logits path."""
    r = {k.removeprefix(f"loss/v{vocab}/"): v for k, v in results.items() if k.startswith(f"loss/v{vocab}/")}
    assert len(r) == 6, r
    for name in ("loss", "dx", "dw"):
        assert r[f"fp64/{name}"] < 1e-12, (name, r)
        assert r[f"fp32/{name}"] < 2e-6, (name, r)


def test_fused_op_large_logits_keep_gradient_precision(results):
    """Logits ~1e4, exact in fp32: the fused backward keeps ~1e-7 relative gradients vs fp64 (the max and the
    log-sum are kept apart); the logits path is reported for comparison (its backward uses one fp32 lse)."""
    r = {k.removeprefix("op/big/"): v for k, v in results.items() if k.startswith("op/big/")}
    assert r["logit_min"] > 9000, r
    for name in ("logp", "ent", "dx", "dw"):
        assert r[f"fused/{name}"] < 1e-6, (name, r)
    print(f"\nlogits ~1e4, fp32 vs fp64: fused dx {r['fused/dx']:.1e} dw {r['fused/dw']:.1e}; "
          f"logits path dx {r['logits/dx']:.1e} dw {r['logits/dw']:.1e}")


def test_fused_op_bf16(results):
    """bf16 inputs: fp32 math per tile; log-probs/entropy exact to fp32, gradients rounded once to bf16."""
    r = {k.removeprefix("op/bf16/"): v for k, v in results.items() if k.startswith("op/bf16/")}
    assert r["logp"] < 1e-6 and r["ent"] < 1e-6, r
    assert r["dx"] < 8e-3 and r["dw"] < 8e-3, r


def test_fused_op_errors(results):
    assert results["op/err/dtype"].startswith("ValueError: weight must be [vocab/tp, h=24] in the hidden dtype")
    assert results["op/err/targets"].startswith("ValueError: targets must be token ids in [0, vocab_size=73)")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", MODELS)
def test_packed_logprobs_equal_padded(results, name, layout):
    r = {k.removeprefix(f"{layout}/{name}/"): v for k, v in results.items() if k.startswith(f"{layout}/{name}/")}
    assert r["layout"] == LAYOUTS[layout]
    assert results[f"ref/{name}/logp_range"] > 3.0, "uninformative reference"
    for path in ("packed_fused", "packed_logits", "padded_fused"):
        assert r[f"{path}/logp"] < REL and r[f"{path}/ent"] < REL, (path, r)
        assert r.get(f"{path}/logp_abs", 0.0) < 5e-6, (path, r)
    assert r["packed_fused/empty_ok"] and r["packed_logits/empty_ok"], "a 1-token sequence must give 0 log-probs"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", MODELS)
def test_packed_training_gradients_equal_padded(results, name, layout):
    r = {k.removeprefix(f"{layout}/{name}/"): v for k, v in results.items() if k.startswith(f"{layout}/{name}/")}
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert r[f"{agg}/loss"] < 1e-6, (agg, r)
        assert r[f"{agg}/grad_rel"] < GRAD_REL, (agg, r)
    if layout == "dp2":  # the exactness claim of loss_scale: DP ranks run different micro-batch counts
        assert r["n_micro_rank0"] != r["n_micro_rank1"], r


def test_pipeline_packs_have_different_shapes(results):
    """PP=2 must exchange shapes: the packs it ran were not all the same length."""
    assert len(results["pp2/pack_tokens"].split(",")) > 1, results["pp2/pack_tokens"]
