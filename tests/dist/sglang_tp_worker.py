"""A colocated SGLang engine with TP 2 driven by two training ranks (the SGLang lane, real SGLang on CPU, gloo):
rank 0 leads the engine (`SGLangEngine.colocated(tp_size=2, ranks=...)`), rank 1 pushes into a `WeightPeer`, and
each engine TP rank loads the bucket packed by its own training rank (SGLang's flattened bucket through
`MultiprocessingSerializer`: CPU shared memory on CPU; with 2 GPUs, rank r's tensors live on GPU r and travel as
CUDA IPC handles to engine TP rank r on the same GPU).

    same      both ranks push model B               -> the engine matches B
    own       rank 0 pushes B, rank 1 pushes A      -> the engine matches neither (TP rank 1 holds A's shards: it
                                                       read rank 1's buffer, not the leader's)
    restored  both push B again                     -> the engine matches B

argv: <model_a_dir> <model_b_dir>. Rank 0 prints `TP <case> diff_b=<max |logp - HF(B)|>`.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from rlad_megatron.rollout.base import SamplingParams
from rlad_megatron.rollout.layout import EngineLayout
from rlad_megatron.rollout.sglang.engine import SGLangEngine, tail_logprobs
from rlad_megatron.rollout.sglang.engine_ranks import WeightPeer, build_engine_ranks
from rlad_megatron.rollout.weight_sync import push_weights

CUDA = torch.cuda.is_available()
KW = {"dtype": "float32", "random_seed": 0, "skip_tokenizer_init": True}
KW.update({"mem_fraction_static": 0.3} if CUDA else {"device": "cpu", "attention_backend": "torch_native",
                                                    "max_total_tokens": 4096})


def named(model) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors on this rank's device (its GPU with CUDA)."""
    device = f"cuda:{torch.cuda.current_device()}" if CUDA else "cpu"
    return [(n, t.detach().clone().to(device)) for n, t in model.state_dict().items()]


def max_diff_vs(engine, model) -> float:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, model.config.vocab_size, (6,), generator=g).tolist() for _ in range(4)]
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True))
    worst = 0.0
    with torch.no_grad():
        for p, o in zip(prompts, outs, strict=True):
            logits = model(torch.tensor([p + o.output_ids])).logits[0].float()
            ref = tail_logprobs(logits, torch.tensor(p + o.output_ids), len(o.output_ids), 1.0)
            worst = max(worst, (torch.tensor(o.output_logprobs) - ref).abs().max().item())
    return worst


def main() -> None:
    a_dir, b_dir = sys.argv[1:3]
    if CUDA:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ranks = build_engine_ranks(EngineLayout(2, 2), rank)
    a = AutoModelForCausalLM.from_pretrained(a_dir, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(b_dir, dtype=torch.float32).eval()
    target = SGLangEngine.colocated(a_dir, server_kwargs=KW, tp_size=2, ranks=ranks) if rank == 0 else \
        WeightPeer(ranks)
    try:
        for case, mine in (("same", b), ("own", a if rank == 1 else b), ("restored", b)):
            push_weights(target, named(mine), version=case, bucket_bytes=64 * 1024)
            if rank == 0:
                print(f"TP {case} diff_b={max_diff_vs(target, b):.3e} buckets_version={target.weight_version}",
                      flush=True)
            dist.barrier()
    finally:
        if rank == 0:
            target.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
