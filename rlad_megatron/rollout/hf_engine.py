"""In-process `transformers` rollout engine: the CPU backend of `RolloutEngine`.

Generation is an explicit KV-cache decode loop (not `model.generate`) so that sampling is exact and
reproducible: log-probs are `log_softmax(raw_logits / T)` before top-k/top-p filtering, and every batch row
samples from its own `torch.Generator` (seed `SamplingParams.seed + i`), one uniform draw per row and step
(inverse-CDF sampling), so a row's output does not depend on the rest of the batch. Prompts are left-padded
with an attention mask and explicit position ids; finished rows are dropped from the batch and its KV cache.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PretrainedConfig

from rlad_megatron.rollout.base import (
    GREEDY_EPS,
    MEMORY_TAGS,
    Rollout,
    SamplingParams,
    WeightUpdateError,
    check_score_args,
)

log = logging.getLogger(__name__)


def sample_from_logits(
    logits: torch.Tensor, sampling: SamplingParams, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. logits [b, V] (any float dtype), uniforms [b] float64 in [0, 1).

    Returns (token ids [b] int64, log-probs [b] fp32) where log-prob = log_softmax(logits / T) at the token,
    before filtering (raw log_softmax for greedy). top-k then top-p are applied on the sorted probabilities with
    SGLang's rule: keep rank < k and keep a token while the mass strictly before it is <= top_p.
    """
    logits = logits.float()
    if sampling.greedy:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / sampling.temperature, -1)
    probs = logp.exp()
    if sampling.top_k == -1 and sampling.top_p >= 1.0:
        order, support = None, probs
    else:
        support, order = probs.sort(dim=-1, descending=True, stable=True)
        if sampling.top_k != -1:
            support[:, sampling.top_k :] = 0.0
        mass_before = support.cumsum(-1) - support
        support = support.masked_fill(mass_before > sampling.top_p, 0.0)
    cdf = support.double().cumsum(-1)  # [b, V]
    target = uniforms * cdf[:, -1]
    pos = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    last_positive = (support > 0).cumsum(-1).argmax(-1)  # guards target == total after rounding
    pos = torch.minimum(pos, last_positive)
    tok = pos if order is None else order.gather(-1, pos[:, None])[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def _as_id_set(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class HFEngine:
    """`RolloutEngine` over a `transformers` causal LM held in this process.

    `model_dir_or_config`: a local HF model directory (weights loaded from it), or a `PretrainedConfig`
    (random weights seeded by `seed`, like SGLang's `load_format="dummy"`; real weights then arrive through
    `update_weights`). `eos_token_ids` defaults to the model's generation config / config EOS ids. A tokenizer is
    loaded from the directory when it has one; it is only needed for stop strings and `Rollout.text`.

    Tied parameters (e.g. `lm_head.weight` tied to `model.embed_tokens.weight`): only the canonical name (the one
    `named_parameters()` lists) is required in a session. An entry under the tied alias is accepted but not
    written; `end_weight_update` checks that it equals the final canonical tensor (after the cast to the engine
    dtype) and raises otherwise, so an exporter that unties the weights is caught.
    """

    def __init__(
        self,
        model_dir_or_config: str | os.PathLike | PretrainedConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        tokenizer=None,
        eos_token_ids: int | Sequence[int] | None = None,
        weight_version: str = "default",
        attn_implementation: str = "sdpa",
    ) -> None:
        self.device = torch.device(device)
        if isinstance(model_dir_or_config, PretrainedConfig):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(
                    model_dir_or_config, dtype=dtype, attn_implementation=attn_implementation
                )
        else:
            path = Path(model_dir_or_config)
            if not path.is_dir():
                raise FileNotFoundError(f"HFEngine: {path} is not a local model directory")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
            if tokenizer is None and (path / "tokenizer_config.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._dtype = self.model.dtype
        # transformers >= 5.2x renames `past_key_values` to `cache` (old name deprecated)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            gen_cfg = getattr(model, "generation_config", None)
            eos_token_ids = getattr(gen_cfg, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
        self.eos_token_ids = _as_id_set(eos_token_ids)
        self._rng = torch.Generator().manual_seed(seed)
        self._params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters())
        by_id = {id(p): n for n, p in self._params.items()}
        self._aliases = {
            n: by_id[id(p)] for n, p in self.model.named_parameters(remove_duplicate=False) if n not in self._params
        }
        self._version = weight_version
        self._session: set[str] | None = None  # names written in the open session
        self._alias_values: dict[str, torch.Tensor] = {}
        self._weights_consistent = True
        self._alive = True

    # ------------------------------------------------------------------ state
    @property
    def weight_version(self) -> str:
        return self._version

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the loaded floating weights."""
        return self._dtype

    @property
    def update_dtype(self) -> None:
        """None: `update_weights` takes any floating dtype and casts inside its in-place copy (one pass, no
        temporary), which is cheaper in-process than casting before the call."""
        return None

    def _check_ready(self) -> None:
        if not self._alive:
            raise RuntimeError("HFEngine is shut down")
        if self._session is not None:
            raise RuntimeError("HFEngine: a weight-update session is open; call end_weight_update() first")
        if not self._weights_consistent:
            raise WeightUpdateError("HFEngine: the last weight update was incomplete; weights are partially updated")

    # ------------------------------------------------------------- generation
    def _row_generators(self, n: int, seed: int | None) -> list[torch.Generator]:
        base = int(torch.randint(0, 2**62, (), generator=self._rng)) if seed is None else seed
        return [torch.Generator().manual_seed(base + i) for i in range(n)]

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> input_ids [B, L], attention_mask [B, L], position_ids [B, L] (left padded)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _decode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] padding mask -> what one decode step attends to: [B, 1, 1, L] bool for SDPA (the model then skips
        building a causal mask per step), else the 2-D mask."""
        return mask[:, None, None, :].bool() if self.model.config._attn_implementation == "sdpa" else mask

    def _matched_stop_string(self, ids: list[int], stops: tuple[str, ...], longest: int) -> str | None:
        tail = self.tokenizer.decode(ids[-(longest + 8) :])
        return next((s for s in stops if s in tail), None)

    @torch.inference_mode()  # no autograd bookkeeping per op: the decode loop is Python-bound on small models
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        """Sample continuations. prompts: B lists of token ids (non-empty) -> B `Rollout`s in prompt order."""
        self._check_ready()
        if any(len(p) == 0 for p in prompts):
            raise ValueError("HFEngine.generate: empty prompt")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("HFEngine.generate: stop strings need a tokenizer")
        n_rows, n_new = len(prompts), sampling.max_new_tokens
        if n_rows == 0:
            return []
        gens = self._row_generators(n_rows, sampling.seed)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        longest_stop = max((len(s) for s in sampling.stop), default=0)

        out_ids = torch.zeros(n_rows, n_new, dtype=torch.long)
        out_lp = torch.zeros(n_rows, n_new, dtype=torch.float32)
        lengths = [n_new] * n_rows
        reasons = ["length"] * n_rows
        matched: list[int | str | None] = [None] * n_rows

        if n_new > 0:
            ids, mask, pos = self._left_pad(prompts)
            cache = DynamicCache(config=self.model.config)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{self._cache_kw: cache},
            ).logits[:, -1]
            active = list(range(n_rows))  # batch row -> prompt index
            pos = pos[:, -1:]
            # row i's draws for every step up front: the same stream as one draw per step from gens[i]
            draws = torch.stack([torch.rand(n_new, generator=g, dtype=torch.float64) for g in gens])  # [B, n_new]
            for step in range(n_new):
                uniforms = draws[active, step]
                tok, lp = sample_from_logits(logits, sampling, uniforms.to(logits.device))
                tok_cpu = tok.cpu()
                out_ids[active, step] = tok_cpu
                out_lp[active, step] = lp.float().cpu()
                done = torch.isin(tok, stop_tensor).cpu().tolist()
                for r, i in enumerate(active):
                    if done[r]:
                        matched[i] = int(tok_cpu[r])
                    elif sampling.stop:
                        hit = self._matched_stop_string(out_ids[i, : step + 1].tolist(), sampling.stop, longest_stop)
                        done[r], matched[i] = hit is not None, hit
                    if done[r]:
                        lengths[i], reasons[i] = step + 1, "stop"
                keep = [r for r in range(len(active)) if not done[r]]
                if step == n_new - 1 or not keep:
                    break
                if len(keep) < len(active):
                    sel = torch.tensor(keep, dtype=torch.long, device=self.device)
                    cache.batch_select_indices(sel)
                    mask, pos, tok = mask[sel], pos[sel], tok[sel]
                    active = [active[r] for r in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                pos = pos + 1
                logits = self.model(
                    input_ids=tok[:, None], attention_mask=self._decode_mask(mask), position_ids=pos, use_cache=True,
                    **{self._cache_kw: cache},
                ).logits[:, -1]

        rollouts = []
        for i, p in enumerate(prompts):
            toks = out_ids[i, : lengths[i]].tolist()
            text = ""
            if self.tokenizer is not None:
                text = self.tokenizer.decode(toks)
                if isinstance(matched[i], str):
                    text = text[: text.find(matched[i])] if matched[i] in text else text
            rollouts.append(Rollout(
                prompt_ids=list(p), output_ids=toks, output_logprobs=out_lp[i, : lengths[i]].tolist(),
                finish_reason=reasons[i], weight_version=self._version, text=text,
                meta={"prompt_tokens": len(p), "completion_tokens": lengths[i], "matched": matched[i]},
            ))
        return rollouts

    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], temperature: float = 1.0
    ) -> list[list[float]]:
        """One right-padded forward -> per row, log_softmax(logits / T) of sequences[i][prompt_lens[i]:]."""
        self._check_ready()
        check_score_args(sequences, prompt_lens, temperature)
        if not sequences:
            return []
        temp = 1.0 if temperature < GREEDY_EPS else temperature
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float() / temp
        tok_lp = logits.gather(-1, ids[:, 1:, None])[..., 0] - torch.logsumexp(logits, -1)  # [B, L-1]
        tok_lp = tok_lp.cpu()
        return [tok_lp[i, p - 1 : len(s) - 1].tolist() for i, (s, p) in enumerate(zip(sequences, prompt_lens))]

    # ------------------------------------------------------------ weight sync
    def begin_weight_update(self) -> None:
        if not self._alive:
            raise WeightUpdateError("HFEngine is shut down")
        if self._session is not None:
            log.warning("HFEngine: begin_weight_update() with a session open; discarding its bookkeeping")
        self._session, self._alias_values = set(), {}

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy one bucket in place. The whole bucket is validated (names, shapes, dtypes) before any write."""
        if self._session is None:
            raise WeightUpdateError("update_weights must run between begin_weight_update() and end_weight_update()")
        plan = []
        for name, t in named_tensors:
            canonical = self._aliases.get(name, name)
            param = self._params.get(canonical)
            if param is None:
                raise WeightUpdateError(f"update_weights: unknown parameter {name!r}")
            if not isinstance(t, torch.Tensor):
                raise WeightUpdateError(f"update_weights: {name!r} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != tuple(param.shape):
                raise WeightUpdateError(
                    f"update_weights: shape mismatch for {name!r}: got {tuple(t.shape)}, expected {tuple(param.shape)}"
                )
            if t.is_floating_point() != param.is_floating_point():
                raise WeightUpdateError(f"update_weights: dtype {t.dtype} for {name!r} cannot load into {param.dtype}")
            plan.append((name, canonical, t, param))
        with torch.no_grad():
            for name, canonical, t, param in plan:
                if name != canonical:
                    self._alias_values[name] = t.detach().to(device=param.device, dtype=param.dtype, copy=True)
                    continue
                self._weights_consistent = False
                param.copy_(t)
                self._session.add(name)

    def end_weight_update(self, version: str) -> None:
        """Close the session; every parameter must have been written in it. Sets `weight_version` on success."""
        if self._session is None:
            raise WeightUpdateError("end_weight_update() without begin_weight_update()")
        written, aliases = self._session, self._alias_values
        self._session, self._alias_values = None, {}
        missing = sorted(set(self._params) - written)
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            raise WeightUpdateError(f"end_weight_update: parameters not updated in this session: {shown}")
        for alias, value in aliases.items():
            canonical = self._aliases[alias]
            if not torch.equal(value, self._params[canonical]):
                raise WeightUpdateError(f"end_weight_update: {alias!r} is tied to {canonical!r} but the values differ")
        self._version = version
        self._weights_consistent = True

    # ----------------------------------------------------- memory and control
    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """No-op: on CPU there is no device memory to free (SGLang on CPU does the same). Checks the tags."""
        self._check_tags(tags)

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """No-op counterpart of `release_memory`."""
        self._check_tags(tags)

    @staticmethod
    def _check_tags(tags: Sequence[str]) -> None:
        unknown = set(tags) - MEMORY_TAGS
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; expected a subset of {sorted(MEMORY_TAGS)}")

    def flush_cache(self) -> None:
        """No-op: the KV cache lives only inside one `generate` call, there is no prefix cache to flush."""

    def health(self) -> bool:
        """True while the engine is up and its weights are a complete set (no half-applied update)."""
        return self._alive and self._weights_consistent

    def shutdown(self) -> None:
        """Drop the model; later calls raise. Idempotent."""
        self._alive = False
        self._session = None
        self.model = None
        self._params, self._aliases = {}, {}
