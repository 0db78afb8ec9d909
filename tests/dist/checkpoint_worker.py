"""Checkpoint checks (run by tests/test_checkpoint.py).

Modes:
  dist DIR          under torchrun (2 ranks): bit-exact resume (plain / DistributedOptimizer / bf16, TP=2 and
                    TP=1 x DP=2, with dropout so RNG restore matters), TP=2 -> TP=1 and PP=2 -> PP=1 reshard,
                    meta / optimizer-kind errors.
  save_hook DIR     1 process: save step 1, then save step 2 with a sleep before the rename (killed there).
  save_loop DIR     1 process: train + save every step forever, keep_last=2 (killed at a random moment).
  verify DIR...     1 process: `latest` of each DIR loads and equals a from-scratch rerun to that step;
                    the next save cleans the leftovers.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlad_megatron import checkpoint as ckpt
from rlad_megatron import platform
from rlad_megatron.models.builder import Model, build_model
from rlad_megatron.models.families import spec_from_hf_config
from rlad_megatron.optim import build_optimizer

SEQ, ROWS = 16, 4


def tiny_spec(tie: bool = False, hidden: int = 64):
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=250, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    ).to_dict()
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    return spec_from_hf_config(cfg)


class Run:
    """A model + DDP + optimizer + scheduler at the current parallel layout, and a deterministic LM step."""

    def __init__(self, *, tie: bool = False, dropout: float = 0.0, distopt: bool = False, bf16: bool = False,
                 hidden: int = 64) -> None:
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.model: Model = build_model(tiny_spec(tie, hidden), params_dtype=dtype, hidden_dropout=dropout,
                                        attention_dropout=dropout)
        self.ddp, self.opt, self.sched = build_optimizer(
            self.model, lr=1e-2, min_lr=1e-3, weight_decay=0.1, clip_grad=1.0, bf16=bf16,
            use_distributed_optimizer=distopt, lr_warmup_steps=1, lr_decay_steps=10, lr_decay_style="cosine",
        )

    def step(self, step: int) -> dict:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        g = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, 250, (ROWS * 2, SEQ), generator=g)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        tokens = tokens[dp_rank * (2 * ROWS // dp):(dp_rank + 1) * (2 * ROWS // dp)].to(platform.device())
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()
        self.ddp.train()
        pos = torch.arange(SEQ, device=tokens.device).unsqueeze(0).expand_as(tokens)
        logits = self.ddp(tokens, pos, None)  # [b, s, v/tp]
        nll = vocab_parallel_cross_entropy(logits[:, :-1].float().transpose(0, 1).contiguous(),
                                           tokens[:, 1:].t().contiguous())
        loss = nll.mean()
        loss.backward()
        self.ddp.finish_grad_sync()
        ok, grad_norm, _ = self.opt.step()
        assert ok
        self.sched.step(1)
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(2, device=platform.device())
        global_loss = loss.detach().clone()  # the mean over the whole batch (all DP ranks)
        dist.all_reduce(global_loss, group=ps.get_data_parallel_group())
        return {"loss": global_loss / dp, "grad_norm": grad_norm, "lr": self.opt.param_groups[0]["lr"],
                "rng": (torch.rand(3), random.random(), float(np.random.rand()), tracked)}

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.module.state_dict().items() if "_extra_state" not in k}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def log(msg: str) -> None:
    if platform.is_rank0():
        print(msg, flush=True)


def check_resume(root: Path, *, tp: int, distopt: bool, sharding: str = ckpt.DEFAULT_OPTIM_SHARDING,
                 tie: bool = False, bf16: bool = False) -> None:
    """2 steps, save, 2 steps; fresh objects (other seed) + load + the same 2 steps: bit-identical."""
    name = f"tp{tp}_{'distopt_' + sharding if distopt else 'plain'}{'_tie' if tie else ''}{'_bf16' if bf16 else ''}"
    save_dir = root / name
    platform.init(platform.Layout(tp=tp), seed=1234)
    run = Run(tie=tie, dropout=0.1, distopt=distopt, bf16=bf16)
    for s in range(2):
        run.step(s)
    path = ckpt.save_checkpoint(save_dir, 2, run.model, run.opt, run.sched, {"consumed_samples": 16, "epoch": 0},
                                optim_sharding_type=sharding)
    assert path == save_dir / "iter_0000002" and ckpt.read_latest(save_dir) == 2
    ref = [run.step(s) for s in (2, 3)]
    ref_params = run.params()

    platform.init(platform.Layout(tp=tp), seed=4321)  # other weights and RNG until the load
    fresh = Run(tie=tie, dropout=0.1, distopt=distopt, bf16=bf16)
    assert not same(fresh.params(), ref_params)
    state = ckpt.load_checkpoint(save_dir, fresh.model, fresh.opt, fresh.sched)
    assert state == {"consumed_samples": 16, "epoch": 0, "step": 2}, state
    assert fresh.sched.num_steps == 2
    got = [fresh.step(s) for s in (2, 3)]
    for r, g in zip(ref, got):
        assert same(r, g), f"{name}: resumed step differs:\n{r}\n{g}"
    assert same(ref_params, fresh.params()), f"{name}: params differ after resume"
    log(f"resume {name}: losses {[round(r['loss'].item(), 5) for r in ref]} bit-identical")


def gathered_logits(run: Run, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    run.ddp.eval()
    with torch.no_grad():
        tokens = tokens.to(platform.device())
        logits = run.ddp(tokens, torch.arange(SEQ, device=tokens.device).unsqueeze(0).expand_as(tokens), None)
        return gather_from_tensor_model_parallel_region(logits)


def check_equals_checkpoint(model: Model, dist_dir: Path) -> int:
    """Every local model tensor equals its slice of the checkpoint's full (unsharded) tensor."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    full = dist_checkpointing.load_plain_tensors(str(dist_dir))
    n = 0
    for v in nested_values(model.module.sharded_state_dict()):
        for sh in nested_values(v.build()) if isinstance(v, ShardedTensorFactory) else [v]:
            if not isinstance(sh, ShardedTensor):
                continue
            assert sh.key in full, f"{sh.key} not in the checkpoint"
            shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            expect = full[sh.key][tuple(slice(o, o + s) for o, s in zip(sh.global_offset, shape))]
            assert torch.equal(expect.reshape(sh.data.shape), sh.data), f"{sh.key} {sh.global_offset} differs"
            n += 1
    assert n >= 10, n
    return n


def check_reshard(root: Path, *, distopt: bool, sharding: str = ckpt.DEFAULT_OPTIM_SHARDING) -> None:
    """Save at TP=2, load at TP=1 (DP=2): model tensors equal the checkpoint's full tensors, logits match,
    and with the optimizer loaded the next 2 steps match the TP=2 continuation."""
    name = f"reshard_{'distopt_' + sharding if distopt else 'plain'}"
    save_dir = root / name
    tokens = torch.randint(0, 250, (2, SEQ), generator=torch.Generator().manual_seed(7))
    platform.init(platform.Layout(tp=2), seed=1234)
    run = Run(distopt=distopt)
    for s in range(2):
        run.step(s)
    ckpt.save_checkpoint(save_dir, 2, run.model, run.opt, run.sched, {}, optim_sharding_type=sharding)
    ref_logits = gathered_logits(run, tokens)
    ref = [run.step(s)["loss"] for s in (2, 3)]

    platform.init(platform.Layout(tp=1), seed=99)
    small = Run(distopt=distopt)
    assert small.model.tp == 1
    if distopt and sharding == "dp_reshardable":
        try:
            ckpt.load_checkpoint(save_dir, small.model, small.opt, small.sched)
        except ckpt.CheckpointError as e:
            assert "dp_reshardable" in str(e), e
        else:
            raise AssertionError("dp_reshardable optimizer state loaded at another TP")
        ckpt.load_checkpoint(save_dir, small.model)  # the model alone reshards
    else:
        ckpt.load_checkpoint(save_dir, small.model, small.opt, small.sched)
    n = check_equals_checkpoint(small.model, save_dir / "iter_0000002" / ckpt.DIST_DIR)
    torch.testing.assert_close(gathered_logits(small, tokens), ref_logits, rtol=0, atol=2e-5)
    if not (distopt and sharding == "dp_reshardable"):
        got = [small.step(s)["loss"] for s in (2, 3)]
        torch.testing.assert_close(torch.stack(got), torch.stack(ref), rtol=0, atol=2e-5)
    log(f"{name}: TP=2 -> TP=1 model equal ({n} tensors), continuation losses {[x.item() for x in ref]}")


def check_pp_reshard(root: Path) -> None:
    """A never-stepped optimizer saved at PP=2 loads at PP=1: model equals the checkpoint and the next step
    is the optimizer's first (step 0 state, as fresh)."""
    save_dir = root / "pp2_step0"
    platform.init(platform.Layout(tp=1, pp=2), seed=1234)
    run = Run(distopt=True)
    assert run.model.pp == 2
    ckpt.save_checkpoint(save_dir, 0, run.model, run.opt, run.sched, {})
    platform.init(platform.Layout(tp=1, pp=1), seed=3)
    flat = Run(distopt=True)
    ckpt.load_checkpoint(save_dir, flat.model, flat.opt, flat.sched)
    n = check_equals_checkpoint(flat.model, save_dir / "iter_0000000" / ckpt.DIST_DIR)
    fresh_params = flat.params()
    platform.init(platform.Layout(tp=1, pp=1), seed=4)
    fresh = Run(distopt=True)
    fresh.model.module.load_state_dict(fresh_params)  # same weights, a fresh optimizer
    assert same(flat.step(0)["loss"], fresh.step(0)["loss"]) and same(flat.params(), fresh.params())
    steps = {float(st["step"]) for st in flat.opt.chained_optimizers[0].optimizer.state.values()}
    assert steps == {1.0}, steps
    log(f"pp2_step0: PP=2 -> PP=1 model equal ({n} tensors); step-0 optimizer state acts as fresh")


def check_meta_errors(root: Path) -> None:
    save_dir = root / "tp1_distopt_fully_reshardable"
    platform.init(platform.Layout(tp=1), seed=5)
    other = build_model(tiny_spec(hidden=32))
    try:
        ckpt.load_checkpoint(save_dir, other)
    except ckpt.CheckpointError as e:
        assert ckpt.META_FILE in str(e) and "hidden_size" in str(e), e
    else:
        raise AssertionError("loaded a checkpoint of another model")
    bigger = build_model(tiny_spec(), padded_vocab=512)
    try:
        ckpt.load_checkpoint(save_dir, bigger)
    except ckpt.CheckpointError as e:
        assert ckpt.META_FILE in str(e) and "padded_vocab=256" in str(e), e
    else:
        raise AssertionError("loaded a checkpoint with another padded vocab")
    try:
        ckpt.load_checkpoint(save_dir, other, step=7)
    except ckpt.CheckpointError as e:
        assert "iter_0000007" in str(e), e
    else:
        raise AssertionError("loaded a missing step")
    plain = Run(distopt=False)
    try:
        ckpt.load_checkpoint(save_dir, plain.model, plain.opt, plain.sched)
    except ckpt.CheckpointError as e:
        assert "DistributedOptimizer" in str(e) and "FP32Optimizer" in str(e), e
    else:
        raise AssertionError("loaded DistributedOptimizer state into a plain optimizer")
    assert ckpt.load_checkpoint(root / "nothing_here", other) == {}
    log("meta errors ok")


def dist_main(root: Path) -> None:
    check_resume(root, tp=2, distopt=False)
    check_resume(root, tp=1, distopt=True)  # DP=2: sharded optimizer state, fully_reshardable
    check_resume(root, tp=2, distopt=True, sharding="dp_reshardable", tie=True)
    check_resume(root, tp=1, distopt=True, sharding="dp_reshardable")
    check_resume(root, tp=2, distopt=False, bf16=True)
    check_resume(root, tp=1, distopt=True, bf16=True)
    check_reshard(root, distopt=False)
    check_reshard(root, distopt=True)
    check_reshard(root, distopt=True, sharding="dp_reshardable")
    check_pp_reshard(root)
    check_meta_errors(root)
    dist.barrier()
    log("CHECKPOINT_DIST_OK")


# --------------------------------------------------------------------------------------------------
# single-process atomicity checks
# --------------------------------------------------------------------------------------------------


def save_hook(save_dir: Path) -> None:
    platform.init(seed=1234)
    run = Run()
    run.step(0)
    ckpt.save_checkpoint(save_dir, 1, run.model, run.opt, run.sched, {})
    print("saved 1", flush=True)
    run.step(1)
    os.environ[ckpt.SLEEP_BEFORE_RENAME_ENV] = "120"
    ckpt.save_checkpoint(save_dir, 2, run.model, run.opt, run.sched, {})
    raise AssertionError("the test should have killed this process during the sleep")


def save_loop(save_dir: Path) -> None:
    platform.init(seed=1234)
    run = Run()
    for s in range(10_000):
        run.step(s)
        ckpt.save_checkpoint(save_dir, s + 1, run.model, run.opt, run.sched, {}, keep_last=2)
        print(f"saved {s + 1}", flush=True)


def verify(dirs: list[Path]) -> None:
    for save_dir in dirs:
        latest = ckpt.read_latest(save_dir)
        assert latest is not None and ckpt.checkpoint_dir(save_dir, latest).is_dir(), (save_dir, latest)
        platform.init(seed=1234)
        ref = Run()
        for s in range(latest):
            ref.step(s)
        ref_params, ref_next = ref.params(), ref.step(latest)
        platform.init(seed=77)
        loaded = Run()
        assert ckpt.load_checkpoint(save_dir, loaded.model, loaded.opt, loaded.sched) == {"step": latest}
        assert same(ref_params, loaded.params()), f"{save_dir}: step {latest} differs from a rerun"
        assert same(ref_next, loaded.step(latest)), f"{save_dir}: step {latest + 1} differs after resume"
        leftovers = [p.name for p in save_dir.iterdir() if p.name.startswith(".")]
        ckpt.save_checkpoint(save_dir, latest + 1, loaded.model, loaded.opt, loaded.sched, {}, keep_last=2)
        names = sorted(p.name for p in save_dir.iterdir())
        assert not any(n.startswith(".") for n in names), names
        assert ckpt.read_latest(save_dir) == latest + 1 and ckpt.list_checkpoints(save_dir)[-1] == latest + 1
        assert len(ckpt.list_checkpoints(save_dir)) <= 2, names
        print(f"verify {save_dir.name}: latest={latest} loads and equals a rerun; leftovers {leftovers} cleaned; "
              f"now {names}", flush=True)
    print("CHECKPOINT_VERIFY_OK", flush=True)


def main() -> None:
    mode, args = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    try:
        if mode == "dist":
            dist_main(args[0])
        elif mode == "save_hook":
            save_hook(args[0])
        elif mode == "save_loop":
            save_loop(args[0])
        elif mode == "verify":
            verify(args)
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        platform.shutdown()


if __name__ == "__main__":
    main()
