"""Weight sync into colocated engines with TP 2 (4 ranks, gloo): two engines on ranks [0, 1] and [2, 3]; each leader
drives an `SGLangEngine` over a recording transport, each peer pushes into a `WeightPeer`. Serialisation is faked
(a payload names the rank, the bucket and its values): what is checked is who sends which bucket to whom, in
which order, with which dtype, and that a failure anywhere reaches every rank of the engine instead of hanging.

Rank 0 and 2 print `CASE <name> OK <details>` per case; any failed check raises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlad_megatron.rollout.base import WeightUpdateError
from rlad_megatron.rollout.layout import EngineLayout
from rlad_megatron.rollout.sglang.engine import SGLangEngine
from rlad_megatron.rollout.sglang.engine_ranks import WeightPeer, build_engine_ranks
from rlad_megatron.rollout.weight_sync import push_weights

RANK = None


def weights() -> list[tuple[str, torch.Tensor]]:
    """The same HF-named fp32 tensors on every rank (as after `export_hf_weights`): 6 tensors of 64 floats."""
    return [(f"layers.{i}.weight", torch.full((8, 8), float(i))) for i in range(6)]


def fake_pack(named):
    """One payload per bucket: '<rank>|<names>|<dtype>|<sum>' (the real one is a CUDA IPC handle of the buffer)."""
    names = ",".join(n for n, _ in named)
    return [f"{RANK}|{names}|{named[0][1].dtype}|{sum(float(t.float().sum()) for _, t in named):g}"], named


class RecordingTransport:
    """The leader's transport: records the per-TP-rank payload list of every bucket; can fail on a bucket."""

    kind = "colocated"
    version = (0, 5, 23)

    def __init__(self, ranks, fail_on_bucket: int | None = None) -> None:
        self.ranks, self.fail_on_bucket = ranks, fail_on_bucket
        self.loaded: list[list[str]] = []
        self.calls: list[str] = []

    def begin(self):
        self.calls.append("begin")

    def end(self):
        self.calls.append("end")

    def load_bucket(self, named, peers=None):
        if self.fail_on_bucket == len(self.loaded):
            raise RuntimeError("scheduler refused the bucket")
        own, _ = fake_pack(named)
        self.loaded.append([own[0], *(c.payloads[0] for c in peers)])

    def set_version(self, version):
        self.calls.append(f"version={version}")

    def flush(self):
        self.calls.append("flush")

    def alive(self):
        return True


def push(target, named, version="v1"):
    return push_weights(target, named, version=version, bucket_bytes=2 * 8 * 8 * 2)  # 2 bf16 tensors per bucket


def case(name: str, ranks, fn_leader, fn_peer) -> None:
    out = fn_leader() if ranks.is_leader else fn_peer()
    dist.barrier()
    if ranks.is_leader:
        print(f"CASE {name} OK engine={ranks.ranks} {out}", flush=True)


def expect_error(fn, match: str) -> str:
    try:
        fn()
    except WeightUpdateError as e:
        assert match in str(e), (match, str(e))
        return str(e)
    raise AssertionError(f"no WeightUpdateError (expected one with {match!r})")


def main() -> None:
    global RANK
    dist.init_process_group("gloo")
    RANK = dist.get_rank()
    ranks = build_engine_ranks(EngineLayout(dist.get_world_size(), 2), RANK)
    assert ranks.ranks == [RANK - RANK % 2, RANK - RANK % 2 + 1] and ranks.is_leader == (RANK % 2 == 0)

    def leader_engine(**kw):
        return SGLangEngine(RecordingTransport(ranks, **kw), update_dtype=torch.bfloat16)

    # 1. every bucket goes to the engine with one payload per TP rank, in TP-rank order, cast to the leader's dtype
    def ok_leader():
        eng = leader_engine()
        stats = push(eng, weights())
        loaded = eng._t.loaded
        assert stats.buckets == 3 and len(loaded) == 3, loaded
        for b, per_rank in enumerate(loaded):
            assert [p.split("|")[0] for p in per_rank] == [str(r) for r in ranks.ranks], per_rank
            assert len({p.split("|", 1)[1] for p in per_rank}) == 1, per_rank  # the same bucket from each rank
            assert per_rank[0].split("|")[1] == f"layers.{2 * b}.weight,layers.{2 * b + 1}.weight", per_rank
            assert per_rank[1].split("|")[2] == "torch.bfloat16", per_rank
        assert eng._t.calls == ["begin", "end", "version=v1", "flush"] and eng.weight_version == "v1"
        return f"buckets={len(loaded)} first={loaded[0]}"

    def ok_peer():
        peer = WeightPeer(ranks, pack=fake_pack)
        stats = push(peer, weights())
        assert peer.update_dtype == torch.bfloat16 and peer.weight_version == "v1" and peer.buckets == stats.buckets == 3

    case("payloads_in_tp_order", ranks, ok_leader, ok_peer)

    # 2. the engine refuses the second bucket: the leader raises, and so does the peer (no hang)
    def refuse_leader():
        return expect_error(lambda: push(leader_engine(fail_on_bucket=1), weights()), "scheduler refused")

    def refuse_peer():
        return expect_error(lambda: push(WeightPeer(ranks, pack=fake_pack), weights()), "scheduler refused")

    case("leader_failure_reaches_peer", ranks, refuse_leader, refuse_peer)

    # 3. a peer exported different tensors: caught at the first bucket that differs, on both sides
    def differ_leader():
        eng = leader_engine()
        msg = expect_error(lambda: push(eng, weights()), "differs from the leader's")
        assert len(eng._t.loaded) == 2, eng._t.loaded  # the third bucket (where the names differ) never loaded
        return msg.split(":")[0]

    def differ_peer():
        push_named = weights()
        push_named[-1] = ("layers.5.bias", push_named[-1][1])
        expect_error(lambda: push(WeightPeer(ranks, pack=fake_pack), push_named), "weight update failed")

    case("mismatched_bucket", ranks, differ_leader, differ_peer)

    # 4. a peer cannot pack its buffer: the leader names it
    def broken_pack(named):
        raise RuntimeError("out of memory for the staging buffer")

    def packfail_leader():
        return expect_error(lambda: push(leader_engine(), weights()), f"rank {ranks.ranks[1]} of the engine")

    def packfail_peer():
        try:
            push(WeightPeer(ranks, pack=broken_pack), weights())
        except RuntimeError as e:
            assert "staging buffer" in str(e)
        else:
            raise AssertionError("the peer's own packing error was swallowed")

    case("peer_failure_reaches_leader", ranks, packfail_leader, packfail_peer)

    # 5. after failures the group still works: a clean push with new values
    def again_leader():
        eng = leader_engine()
        push(eng, [(n, t + 1) for n, t in weights()], version="v2")
        assert eng.weight_version == "v2" and all(p[0].split("|")[3] == p[1].split("|")[3] for p in eng._t.loaded)
        return f"sums={[p[0].split('|')[3] for p in eng._t.loaded]}"

    def again_peer():
        push(WeightPeer(ranks, pack=fake_pack), [(n, t + 1) for n, t in weights()], version="v2")

    case("recovers_after_failures", ranks, again_leader, again_peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
