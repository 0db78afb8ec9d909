"""GPU lane: one-GPU checks of the Megatron student (local and TE specs, bf16, FP8), offload, and colocated SGLang.

Every module skips cleanly without CUDA (`pytestmark`), and TE / SGLang / FP8 tests also skip without their
packages or hardware. Run with `-s` to see the numbers each test prints (step times, memory, log-prob diffs):

    OMP_NUM_THREADS=1 python -m pytest -q -s tests/gpu
"""

from __future__ import annotations

import time

import pytest
import torch

# hidden/ffn/vocab multiples of 128 and 256 tokens per micro-batch: FP8 GEMMs need dims divisible by 16
TINY = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "rope_theta": 10000.0}
SEQ, MBS = 128, 2


def megatron_available() -> bool:
    try:
        import megatron.core  # noqa: F401
    except Exception:  # noqa: BLE001 - a TE meta package without TE breaks the import with RuntimeError
        return False
    return True


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny Qwen2 (fp32 safetensors) saved locally."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("gpu_tiny_qwen2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(architectures=["Qwen2ForCausalLM"], **TINY)).float().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def megatron():
    """torch.distributed (nccl, 1 rank) + Megatron parallel state via `platform.init`."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not megatron_available():
        pytest.skip("megatron-core is not importable")
    from rlad_megatron import platform

    platform.init(platform.Layout(), seed=1234)
    yield platform
    platform.shutdown()


@pytest.fixture(scope="session")
def hf_reference(tiny_hf_dir):
    """The HF model on the GPU in fp32: the log-prob reference for the Megatron and SGLang paths."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).cuda().eval()


def random_tokens(n: int = MBS * 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (n, seq), generator=g)


@torch.no_grad()
def hf_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    """[N, L-1] fp32 log p(tokens[:, t+1] | tokens[:, :t+1]) from an HF forward."""
    logits = model(tokens.cuda()).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:].cuda()[..., None])[..., 0].cpu()


def build_student(hf_dir, *, dtype=torch.bfloat16, use_te: bool = False, **overrides):
    from rlad_megatron.convert import load_hf_into_megatron
    from rlad_megatron.models import spec_from_hf_config
    from rlad_megatron.models.builder import build_model

    model = build_model(spec_from_hf_config(hf_dir), params_dtype=dtype, use_te=use_te, seq_length=SEQ, **overrides)
    load_hf_into_megatron(model, hf_dir)
    return model


def ce_loss(mb: dict, logits: torch.Tensor):
    """Next-token cross-entropy over logits [b, s, V] (TP=1); returns (loss, metrics) for run_schedule."""
    tokens = mb["tokens"].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    return loss, {"loss": loss.detach().item()}


def train_steps(model, steps: int = 4, lr: float = 1e-3, tokens: torch.Tensor | None = None, **opt_kw):
    """`steps` optimizer steps on one fixed batch (memorisation: the loss must fall).

    Returns (losses, per-step seconds after the first, (ddp, optimizer))."""
    from rlad_megatron.models.forward import run_schedule
    from rlad_megatron.optim import build_optimizer

    ddp, opt, _ = build_optimizer(model, lr=lr, bf16=model.config.bf16, **opt_kw)
    tokens = random_tokens() if tokens is None else tokens
    micro = [{"tokens": t} for t in tokens.split(MBS)]
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        metrics = run_schedule(model, ddp, micro, ce_loss, forward_only=False)
        ok, _, _ = opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert ok, "optimizer step skipped (non-finite grads)"
        losses.append(sum(m["loss"] for m in metrics) / len(metrics))
    return losses, times[1:], (ddp, opt)


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (conftest modules are not importable by name)."""
    import types

    return types.SimpleNamespace(TINY=TINY, SEQ=SEQ, MBS=MBS, random_tokens=random_tokens, hf_logprobs=hf_logprobs,
                                 build_student=build_student, ce_loss=ce_loss, train_steps=train_steps)
