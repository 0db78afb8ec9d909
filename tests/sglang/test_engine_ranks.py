"""Weight sync into colocated SGLang engines with TP > 1, on CPU without sglang: the per-TP-rank payload gather
over gloo (4 ranks, two TP-2 engines; serialisation faked, see tests/dist/engine_ranks_worker.py) and the
`--rollout-num-gpus-per-engine` vs GPUs-per-node check."""

from __future__ import annotations

import pytest

from rlad_megatron.rollout.sglang.engine_ranks import EngineRanks, WeightPeer, bucket_digest, check_local_tp
from tests.conftest import ROOT


def test_each_tp_rank_gets_its_own_ranks_payload_and_failures_reach_every_rank(torchrun):
    log = torchrun(ROOT / "tests/dist/engine_ranks_worker.py", nproc=4, timeout=600)
    cases = ["payloads_in_tp_order", "leader_failure_reaches_peer", "mismatched_bucket",
             "peer_failure_reaches_leader", "recovers_after_failures"]
    for name in cases:
        for engine in ("[0, 1]", "[2, 3]"):
            assert f"CASE {name} OK engine={engine}" in log, (name, engine, log)
    first = next(x for x in log.splitlines() if x.startswith("CASE payloads_in_tp_order OK engine=[2, 3]"))
    assert "'2|layers.0.weight,layers.1.weight" in first and "'3|layers.0.weight,layers.1.weight" in first, first


def test_engine_tp_must_divide_the_gpus_per_node():
    assert check_local_tp(4, 4, 8) == 4 and check_local_tp(1, 3, 8) == 3
    with pytest.raises(ValueError, match="--rollout-num-gpus-per-engine 3 must divide the GPUs .* per node \\(8\\)"):
        check_local_tp(3, 0, 8)
    with pytest.raises(ValueError, match="LOCAL_RANK 2"):
        check_local_tp(4, 2, 8)


def test_bucket_digest_and_peer_roles():
    import torch

    a = [("w", torch.zeros(2, 3)), ("b", torch.zeros(3))]
    assert bucket_digest(a) == bucket_digest([(n, t + 1) for n, t in a])  # values do not matter, layout does
    assert bucket_digest(a) != bucket_digest(a[::-1]) != bucket_digest([("w", torch.zeros(3, 2)), a[1]])
    assert bucket_digest(a) != bucket_digest([(n, t.bfloat16()) for n, t in a])
    with pytest.raises(ValueError, match="not one of the engine's ranks"):
        EngineRanks(None, [2, 3], 0)
    with pytest.raises(ValueError, match="non-leader"):
        WeightPeer(EngineRanks(None, [0, 1], 0))
