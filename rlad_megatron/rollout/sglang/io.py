"""SGLang request and result dicts <-> the rollout contract (`SamplingParams`, `Rollout`); pure functions.

`sampling_dict` maps sampling settings to SGLang's `sampling_params`; `rollout_from_output` builds a `Rollout` from
the `meta_info.output_token_logprobs` triples (which keep the stop token, see `rollout.base`); `_tail_logprobs`
lines prefill (input) log-probs up with the scored tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlad_megatron.rollout.base import Rollout, SamplingParams


def sampling_dict(sp: SamplingParams, *, seed: int | None = None) -> dict:
    """`SamplingParams` -> SGLang's sampling_params dict. Stop tokens stay in the output (no_stop_trim).

    SGLang's `ignore_eos` also disables `stop_token_ids`; the project's contract keeps them, so with both set the
    ids are not sent and `rollout_from_output` cuts at the first one instead (same tokens, same log-probs).
    """
    d = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
         "max_new_tokens": sp.max_new_tokens, "ignore_eos": sp.ignore_eos, "no_stop_trim": True}
    if sp.stop_token_ids and not sp.ignore_eos:
        d["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.stop:
        d["stop"] = list(sp.stop)
    if seed is not None:
        d["sampling_seed"] = int(seed)
    return d


def rollout_from_output(prompt: Sequence[int], out: dict, version: str,
                        client_stop_ids: Sequence[int] = ()) -> Rollout:
    """One SGLang result -> `Rollout`; ids and log-probs come from `meta_info.output_token_logprobs` triples
    (logprob, token_id, text), which keep the stop token even where `output_ids` was trimmed.
    `client_stop_ids`: stop tokens applied here (see `sampling_dict`)."""
    meta = out.get("meta_info", {})
    triples = meta.get("output_token_logprobs") or []
    ids = [int(t[1]) for t in triples]
    logprobs = [float(t[0]) for t in triples]
    if not triples and out.get("output_ids"):
        raise RuntimeError("SGLang returned tokens without log-probs (return_logprob was not honoured)")
    fr = meta.get("finish_reason") or {}
    reason = fr.get("type", "length") if isinstance(fr, dict) else str(fr)
    matched = fr.get("matched") if isinstance(fr, dict) else None
    cut = next((i for i, t in enumerate(ids) if t in set(client_stop_ids)), None)
    if cut is not None:
        ids, logprobs, reason, matched = ids[: cut + 1], logprobs[: cut + 1], "stop", ids[cut]
    return Rollout(prompt_ids=list(prompt), output_ids=ids, output_logprobs=logprobs, finish_reason=reason,
                   weight_version=version, text=out.get("text") or "" if cut is None else "",
                   meta={"prompt_tokens": len(prompt), "completion_tokens": len(ids), "matched": matched,
                         "engine_weight_version": meta.get("weight_version")})


def _tail_logprobs(entries: list, seq: Sequence[int], n: int) -> list:
    """The last `n` entries of SGLang's input log-prob list, checked against the last `n` tokens of `seq`.

    SGLang 0.5.23 reports the id of token `vocab_size - 1` as 0 in input-log-prob triples (the log-prob itself is
    that of the right token, checked against an HF forward), so a reported 0 is accepted for any token.
    """
    if n == 0:
        return []
    tail = entries[-n:]
    ok = len(tail) == n and all(e[0] is not None and int(e[1]) in (int(t), 0) for e, t in zip(tail, seq[-n:]))
    if not ok:
        raise RuntimeError(f"SGLang prefill log-probs do not line up with the scored tokens ({len(entries)} entries "
                           f"for {n} tokens)")
    return tail
