"""Two training ranks (Megatron on CPU, gloo) against remote SGLang servers behind sglang-router: the trainer side
of the SGLang lane's data-parallel test (tests/sglang/test_sglang_remote_dp.py starts the servers and the router in
the lane venv and runs this with the project's Python, which has Megatron and no sglang).

Both ranks are generation clients (`--rollout-engine sglang-remote`): they take chunks from the job's shared queue
and send one request per sample through the router; rank 0 alone pushes the weights (`update_weights_from_distributed`
over gloo, one group with both servers). Each server is then given its own weight-version label, so every rollout
says which server produced it. Three rounds:

    before   the servers still hold the model they started with: far from the Megatron student
    synced   after the first push: every rollout's log-probs match the student's forward on both servers
    updated  after the student changed and the next push: they match the new weights on both servers

argv: <out_dir> <student_hf> <router_url>. Rank 0 prints `ROUND <name> counts={server label: rollouts}
ranks={rank: rollouts} maxdiff={server label: max |logp diff|}` per round.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import requests
import torch
import torch.distributed as dist

from rlad_megatron import platform
from rlad_megatron.arguments import parse_args
from rlad_megatron.models.forward import compute_logprobs
from rlad_megatron.rollout.base import SamplingParams
from rlad_megatron.step.generate import generate_everywhere
from rlad_megatron.step.run import build_run
from rlad_megatron.step.sync import sync_weights


def label_servers(run, tag: str) -> None:
    """Rank 0 gives server i the weight-version label `<tag>@<i>` (echoed in every response's meta_info)."""
    if dist.get_rank() == 0:
        for i, url in enumerate(run.engine._t.urls):
            r = requests.post(url + "/update_weight_version", json={"new_version": f"{tag}@{i}",
                                                                      "abort_all_requests": False}, timeout=60)
            assert r.status_code == 200, r.text
    dist.barrier()


def one_round(run, tag: str) -> tuple[dict, dict, dict, dict]:
    """Generate 8 prompts x 4 samples on both clients. Each client records what its engine returned (the server's
    label travels in each response; the tensor exchange keeps only ids, log-probs and rewards); the records of both
    ranks must be exactly the exchanged rollouts. Returns rollouts per server label and per rank, max
    |logp_engine - logp_Megatron| per server label, and the generation perf metrics."""
    label_servers(run, tag)
    records, generate = [], run.engine.generate

    def recording(prompts, sampling):
        outs = generate(prompts, sampling)
        records.extend((r.weight_version, r.prompt_ids, r.output_ids, r.output_logprobs) for r in outs)
        return outs

    run.engine.generate = recording
    try:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=7)
        rollouts, _, perf = generate_everywhere(run, run.train_prompts.samples[:8], 4, sampling, run.scorer,
                                                "lane round")
    finally:
        run.engine.generate = generate
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, records)
    recs = [(rank, *rec) for rank, part in enumerate(every) for rec in part]
    key = lambda prompt, out, lps: (tuple(prompt), tuple(out), tuple(round(x, 6) for x in lps))  # noqa: E731
    assert sorted(key(*r[2:]) for r in recs) == sorted(
        key(r.prompt_ids, r.output_ids, r.output_logprobs) for r in rollouts), "exchange != what the engines returned"
    width = max(len(r[2]) + len(r[3]) for r in recs)
    tokens = torch.full((len(recs), width), run.pad_id, dtype=torch.long)
    for i, r in enumerate(recs):
        tokens[i, :len(r[2]) + len(r[3])] = torch.tensor(r[2] + r[3])
    ref, _ = compute_logprobs(run.policy.model, tokens, temperature=1.0)  # collective over DP: every rank
    by_server, by_rank, worst = defaultdict(int), defaultdict(int), defaultdict(float)
    for i, (rank, label, prompt, out, lps) in enumerate(recs):
        p, o = len(prompt), len(out)
        diff = (torch.tensor(lps, dtype=torch.float64) - ref[i, p - 1:p - 1 + o].double()).abs().max()
        by_server[label] += 1
        by_rank[rank] += 1
        worst[label] = max(worst[label], float(diff))
    return dict(by_server), dict(by_rank), dict(worst), perf


def main() -> None:
    out, student, router = sys.argv[1:4]
    platform.init_distributed()
    args = parse_args(["--algo", "grpo", "--prompt-data", "builtin:addition", "--no-chat-template", "--train-size",
                       "64", "--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--max-response-len", "12",
                       "--micro-batch-size", "4", "--reward", "tests.loop_rewards:length_parity", "--seed", "3",
                       "--rollout-engine", "sglang-remote", "--sglang-router-url", router,
                       "--rollout-max-inflight", "4", "--check-weight-sync", "--student-hf", student,
                       "--output-dir", out])
    platform.init(platform.Layout(), seed=args.seed)
    run = build_run(args)
    rank = dist.get_rank()
    assert run.engine.mode == "remote" and run.engine.receives_weights == (rank == 0), rank
    assert len(run.engine._t.urls) == 2, run.engine._t.urls  # the router's workers

    results = {"before": one_round(run, "before")}
    sync = sync_weights(run)
    results["synced"] = one_round(run, "synced")
    with torch.no_grad():  # the student changes (the same on both DP replicas), as after an optimizer step
        g = torch.Generator().manual_seed(11)
        for p in run.policy.model.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    run.state.step += 1
    sync2 = sync_weights(run)
    results["updated"] = one_round(run, "updated")
    if rank == 0:
        for name, (counts, ranks, worst, perf) in results.items():
            print(f"ROUND {name} counts={counts} ranks={ranks} maxdiff={ {k: float(f'{v:.2e}') for k, v in worst.items()} } "
                  f"clients={perf['perf/rollout_engines']:.0f} generate_s={perf['perf/generate_s']:.2f}", flush=True)
        print(f"SYNC first={sync.get('perf/sync_s', 0):.2f}s probe={sync['rollout/sync_probe_logp_max_diff']:.2e} "
              f"second={sync2.get('perf/sync_s', 0):.2f}s probe={sync2['rollout/sync_probe_logp_max_diff']:.2e}",
              flush=True)
    run.engine.shutdown()
    platform.shutdown()


if __name__ == "__main__":
    main()
