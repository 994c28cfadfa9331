"""Per-request SDPA for transformers' continuous batching on a CPU.

With `sdpa`, continuous batching (transformers 5.24) runs one SDPA call per layer over the whole packed batch:
queries [all the step's new tokens] × keys [every request's past and new tokens], behind a block-diagonal mask that it
allocates as [max_batch_tokens, the whole cache + max_batch_tokens] and refills every step. So a prefill chunk pays
for the keys of every other request in the step, ten long prompts arriving together cost far more than ten times
one, and the mask alone can take a gigabyte. Here each request attends to its own keys only: Σ qᵢ·kᵢ work instead of
Q·K, and no cache-sized mask (the manager builds none for an implementation it does not know).

Measured on 2 CPU cores, tiny Llama, ten 3,900-token prompts at once: the last first token came about 10× after one
prompt's alone, against 28-37× with `sdpa` (docs/engine.md has the profile and the figures). Outputs match `sdpa` to
4e-7.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CB_VARLEN_SDPA = "cb_varlen_sdpa"
# Consecutive decode rows share one SDPA call under a block-diagonal mask, where every row is scored against every
# key of the call. A row joins the call before it while the masked-out query-key pairs that row adds (its own keys
# for each row already there, and their keys for it) stay within this many: about what one more call costs on a
# CPU, for a model as small as SmolLM2 (measured, 2 CPUs: per-request calls are 2-5x faster than one call over 32
# rows of 100-1,000 keys). It bounds what each row adds, not a call's total.
PACK_DECODE_MAX_ADDED_PAIRS = 1024


@dataclass(frozen=True, slots=True)
class _Call:
    """One SDPA call of a step: queries [q_start, q_end) against keys [k_start, k_end)."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    mask: torch.Tensor | None
    causal: bool
    cached: int = 0  # a chunk of a prompt whose start is cached: the keys before its own


# Each generation thread (one per engine) plans its own steps; the plan is built at the first layer of a step and
# reused by the others, which see the same request boundaries.
_plans = threading.local()


def plan_step(cu_q: list[int], cu_k: list[int], dtype: torch.dtype) -> list[_Call]:
    """The SDPA calls that compute one step, from the cumulative query and key lengths of its requests."""
    calls: list[_Call] = []
    lowest = torch.finfo(dtype).min
    count, i = len(cu_q) - 1, 0
    while i < count:
        q_len, k_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if q_len == 0:
            i += 1
            continue
        if q_len == 1:  # decoding: extend to the run of consecutive decode rows
            j = i + 1
            while j < count and cu_q[j + 1] - cu_q[j] == 1 and _added_pairs(cu_k, i, j) <= PACK_DECODE_MAX_ADDED_PAIRS:
                j += 1
            mask = None
            if j - i > 1:
                starts = torch.tensor(cu_k[i:j]) - cu_k[i]
                ends = torch.tensor(cu_k[i + 1 : j + 1]) - cu_k[i]
                positions = torch.arange(cu_k[j] - cu_k[i])
                own = (positions >= starts[:, None]) & (positions < ends[:, None])
                mask = torch.zeros(own.shape, dtype=dtype).masked_fill_(~own, lowest)
            calls.append(_Call(cu_q[i], cu_q[j], cu_k[i], cu_k[j], mask, False))
            i = j
            continue
        if q_len == k_len:  # the whole prompt in this step
            calls.append(_Call(cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1], None, True))
        else:  # a chunk of a prompt whose start is cached: causal, aligned bottom-right
            calls.append(_Call(cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1], None, False, cached=k_len - q_len))
        i += 1
    return calls


def _added_pairs(cu_k: list[int], first: int, row: int) -> int:
    """The masked-out query-key pairs that decode row `row` adds by joining rows [first, row) in one call."""
    return (row - first) * (cu_k[row + 1] - cu_k[row]) + cu_k[row] - cu_k[first]


def varlen_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, H, Q, D], key and value [1, H_kv, K, D], packed by request along the sequence. Outside continuous
    batching (no `cu_seq_lens`), exactly `sdpa`."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    step = (tuple(cu_seq_lens_q.tolist()), tuple(cu_seq_lens_k.tolist()), query.dtype)
    if getattr(_plans, "step", None) != step:  # the first layer of a step
        _plans.step, _plans.calls = step, plan_step(list(step[0]), list(step[1]), query.dtype)
    groups = getattr(module, "num_key_value_groups", 1)
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])  # [1, Q, H, D]
    for call in _plans.calls:
        queries = query[:, :, call.q_start : call.q_end]
        keys, values = key[:, :, call.k_start : call.k_end], value[:, :, call.k_start : call.k_end]
        if call.cached:
            attended = _attend_after_cached(queries, keys, values, call.cached, scaling, groups)
        else:
            attended = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=call.mask, is_causal=call.causal, scale=scaling, enable_gqa=groups > 1
            )
        out[:, call.q_start : call.q_end] = attended.transpose(1, 2)
    return out, None


def _attend_after_cached(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cached: int, scale: float | None, groups: int
) -> torch.Tensor:
    """A prompt chunk's queries against the cached keys before it (all visible) and its own keys (causal): two flash
    calls, merged by their log-sum-exps. SDPA with a bottom-right causal bias would build the dense mask on a CPU and
    run its masked kernel over every query-key pair; ten 3,900-token prompts spent 60 % of their time there."""
    if groups > 1:  # the flash kernel has no grouped-query mode: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    before, lse_before = flash(query, key[:, :, :cached], value[:, :, :cached], 0.0, False, scale=scale)
    own, lse_own = flash(query, key[:, :, cached:], value[:, :, cached:], 0.0, True, scale=scale)
    top = torch.maximum(lse_before, lse_own)
    weight_before, weight_own = (lse_before - top).exp().unsqueeze(-1), (lse_own - top).exp().unsqueeze(-1)
    return ((before * weight_before + own * weight_own) / (weight_before + weight_own)).to(query.dtype)


def varlen_sdpa_supported(model: Any) -> bool:
    """Full causal attention only: this function knows no sliding windows, softcapping or attention sinks."""
    config = model.config.get_text_config()
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (
        layer_types == {"full_attention"}
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attn_logit_softcapping", None) is None
        and not any(hasattr(module, "sinks") for module in model.modules())
    )


def register_varlen_sdpa() -> None:
    """Register the implementation under `CB_VARLEN_SDPA`; its mask function is sdpa's, so a plain forward or
    `generate` call with it behaves exactly as `sdpa`."""
    AttentionInterface.register(CB_VARLEN_SDPA, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(CB_VARLEN_SDPA, sdpa_mask)
