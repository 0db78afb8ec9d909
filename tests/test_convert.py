"""HF <-> Megatron conversion. Pure checks run here (layouts, name tables against real HF checkpoints,
bad-input errors, atomic output); everything that needs Megatron models runs in one 2-rank torchrun
launch of tests/dist/convert_worker.py (logits vs transformers at TP=1/TP=2/PP=2, bit-exact round trips,
dist-checkpoint resharding, the CLI tools, bad input on every rank)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist" / "convert_worker.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load(WORKER, "convert_worker")


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    for case in worker.CASES:
        worker.make_hf_model(case, root / case)
    worker.make_hf_model("qwen3", root / "qwen3_bf16", dtype=torch.bfloat16, seed=1)
    worker.make_bad_checkpoints(root)
    return root


def test_layouts_split_and_merge_are_inverse():
    from rlad_megatron.convert.common import QKV, GateUp, ShardContext, Split, VocabRows, fuse_qkv
    from rlad_megatron.models.families import spec_from_hf_config

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 3, "num_hidden_layers": 1, "intermediate_size": 6, "vocab_size": 5}
    spec = spec_from_hf_config(cfg)
    q, k, v = torch.randn(12, 8), torch.randn(6, 8), torch.randn(6, 8)
    # Megatron's grouped order: [q0 q1 k0 v0 | q2 q3 k1 v1] (3 rows per head)
    fused = fuse_qkv(q, k, v, num_groups=2)
    assert torch.equal(fused[:12], torch.cat([q[:6], k[:3], v[:3]]))
    assert torch.equal(fused[12:], torch.cat([q[6:], k[3:], v[3:]]))
    cases = [(QKV(), [q, k, v]), (GateUp(), [torch.randn(6, 8), torch.randn(6, 8)]), (Split(1), [torch.randn(8, 6)]),
             (VocabRows(), [torch.randn(5, 8)])]
    for layout, full in cases:
        shards = []
        for rank in range(2):
            ctx = ShardContext(spec, 2, rank, padded_vocab=8)
            idx = layout.read_slices([t.shape for t in full], ctx)
            shards.append(layout.to_shard([t[i] if i else t for t, i in zip(full, idx, strict=True)], ctx))
        merged = layout.merge(shards, ShardContext(spec, 2, 0, padded_vocab=8))
        assert all(torch.equal(a, b) for a, b in zip(merged, full, strict=True)), type(layout).__name__
    gate_shard = GateUp().to_shard([torch.arange(6.0)[:3, None], torch.arange(6.0, 12)[:3, None]], None)
    assert gate_shard.flatten().tolist() == [0, 1, 2, 6, 7, 8]  # [gate; up] of rank 0
    vocab_shard = VocabRows().to_shard([torch.ones(1, 8)], ShardContext(spec, 2, 1, padded_vocab=8))
    assert vocab_shard.shape == (4, 8) and vocab_shard[1:].abs().sum() == 0  # rows 4..7: row 4 real, 5..7 zero


def test_name_tables_match_hf_checkpoints(hf_root):
    from rlad_megatron.convert import expected_hf_tensors
    from rlad_megatron.convert.hf_to_megatron import SafetensorsCheckpoint
    from rlad_megatron.models.families import spec_from_hf_config

    for case in [*worker.CASES, "qwen3_bf16"]:
        spec = spec_from_hf_config(hf_root / case)
        with SafetensorsCheckpoint(hf_root / case) as ckpt:
            found = {n: ckpt.shape(n) for n in ckpt.names()}
        assert found == expected_hf_tensors(spec), case


def test_bad_checkpoints_are_named(hf_root):
    from rlad_megatron.convert import check_hf_checkpoint
    from rlad_megatron.convert.hf_to_megatron import SafetensorsCheckpoint, check_same_model
    from rlad_megatron.models.families import spec_from_hf_config

    spec = spec_from_hf_config(hf_root / "qwen2_untied")
    for bad, needle in (("bad_missing", "missing tensor model.layers.1.mlp.up_proj.weight"),
                        ("bad_extra", "unexpected tensor model.layers.0.mlp.extra_proj.weight"),
                        ("bad_shape", "model.layers.0.self_attn.k_proj.weight has shape [48, 64], expected [32, 64]")):
        with SafetensorsCheckpoint(hf_root / bad) as ckpt, pytest.raises(ValueError, match=needle.replace(".", r"\.")
                                                                        .replace("[", r"\[")):
            check_hf_checkpoint(ckpt, spec)
    with SafetensorsCheckpoint(hf_root / "tied_lm_head") as ckpt:  # a redundant tied lm_head is accepted
        check_hf_checkpoint(ckpt, spec_from_hf_config(hf_root / "qwen2_tied"))
    with pytest.raises(ValueError, match="ffn_hidden_size: model has 96, .* has 128"):
        check_same_model(spec, spec_from_hf_config(hf_root / "other_model"), "other_model")
    with pytest.raises(ValueError, match="no model.safetensors"):
        SafetensorsCheckpoint(hf_root)


def test_unknown_architecture_and_family(hf_root, tmp_path):
    from rlad_megatron.convert import mapping_for

    to_mcore = _load(ROOT / "tools" / "convert_hf_to_megatron.py", "convert_hf_to_megatron")
    src = tmp_path / "mistral"
    src.mkdir()
    cfg = json.loads((hf_root / "llama3" / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="MistralForCausalLM.*not supported"):
        to_mcore.main(["--hf-dir", str(src), "--save", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()
    with pytest.raises(ValueError, match="no HF <-> Megatron converter for family 'gpt2'"):
        mapping_for("gpt2")
    to_hf = _load(ROOT / "tools" / "convert_megatron_to_hf.py", "convert_megatron_to_hf")
    with pytest.raises(ValueError, match="a Hugging Face dir, expected a Megatron checkpoint"):
        to_hf.main(["--load", str(hf_root / "llama3"), "--hf-template", str(hf_root / "llama3"),
                    "--save", str(tmp_path / "out")])
    if importlib.util.find_spec("megatron.bridge") is None:
        with pytest.raises(ValueError, match="Megatron-Bridge"):
            to_mcore.main(["--hf-dir", str(hf_root / "llama3"), "--save", str(tmp_path / "out"), "--backend", "bridge"])
        assert not (tmp_path / "out").exists()


def test_atomic_dir(tmp_path):
    from rlad_megatron.convert.common import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_convert_two_ranks(torchrun, hf_root):
    """Logits vs transformers per family at TP=1/TP=2/PP=2, bit-exact export, dist-ckpt reshard, tools."""
    stdout = torchrun(WORKER, hf_root, nproc=2, timeout=600)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    diffs = json.loads(line.removeprefix("RESULT "))
    expected = {f"{case}/{tag}" for case in worker.LOGIT_CASES for tag in ("tp1", "tp2", "pp2")}
    expected |= {f"{saved}->{tag}" for saved in ("qwen2_tied-tp2", "llama3-tp2", "qwen3-pp2", "qwen2_untied-pp2")
                 for tag in ("tp1", "tp2")}
    expected |= {"qwen2_tied/tp1-from-tool-hf", "qwen2_tied/tp1-from-tied_lm_head"}
    assert expected <= diffs.keys(), sorted(expected - diffs.keys())
    assert max(diffs.values()) < 1e-4, diffs
    print("max |logit diff| vs transformers:", json.dumps(diffs, indent=1))
