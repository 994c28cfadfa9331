"""Per-request SDPA computes what continuous batching's masked SDPA over the packed batch computes."""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.utils import build_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bot.engine.local.varlen_sdpa import PACK_DECODE_MAX_ADDED_PAIRS, plan_step, varlen_sdpa_attention_forward


class Layer(torch.nn.Module):
    num_key_value_groups = 4


# (cached past, new tokens) per request: decode rows, whole prompts, chunks of prompts with a cached start, and a
# decode row with a past longer than a packed run may waste.
REQUESTS = [
    (0, 37),
    (100, 1),
    (50, 1),
    (0, 1),
    (300, 200),
    (7, 5),
    (9, 1),
    (20_000, 1),
    (3, 1),
]


def packed_batch() -> tuple[list[int], list[int]]:
    cu_q, cu_k = [0], [0]
    for past, new in REQUESTS:
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + past + new)
    return cu_q, cu_k


def test_it_matches_masked_sdpa_over_the_packed_batch() -> None:
    torch.manual_seed(0)
    cu_q, cu_k = packed_batch()
    heads, kv_heads, dim = 8, 2, 16
    query = torch.randn(1, heads, cu_q[-1], dim)
    key, value = torch.randn(1, kv_heads, cu_k[-1], dim), torch.randn(1, kv_heads, cu_k[-1], dim)
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q, cu_k)
    expected, _ = sdpa_attention_forward(Layer(), query, key, value, mask, scaling=0.3)

    got, _ = varlen_sdpa_attention_forward(
        Layer(),
        query,
        key,
        value,
        None,
        scaling=0.3,
        cu_seq_lens_q=torch.tensor(cu_q, dtype=torch.int32),
        cu_seq_lens_k=torch.tensor(cu_k, dtype=torch.int32),
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_each_request_reads_its_own_keys_and_decode_rows_share_calls() -> None:
    cu_q, cu_k = packed_batch()
    calls = plan_step(cu_q, cu_k, torch.float32)
    assert sum(call.q_end - call.q_start for call in calls) == cu_q[-1]  # every query row, once
    keys_read = sum((call.q_end - call.q_start) * (call.k_end - call.k_start) for call in calls)
    assert keys_read < cu_q[-1] * cu_k[-1] / 10  # far from every query against every key
    # The decode rows of requests 1-3 go in one call; the long one (request 7) alone.
    assert (calls[1].q_start, calls[1].q_end) == (cu_q[1], cu_q[4])
    long_decode = next(call for call in calls if call.q_start == cu_q[7])
    assert (long_decode.q_end, long_decode.mask) == (cu_q[8], None)
    whole_prompt, chunk = calls[0], calls[2]
    assert whole_prompt.causal and whole_prompt.mask is None and whole_prompt.cached == 0
    # A chunk after 300 cached tokens: no mask is built; its own 200 keys are read causally after the 300.
    assert (chunk.q_end - chunk.q_start, chunk.k_end - chunk.k_start, chunk.cached) == (200, 500, 300)
    assert chunk.mask is None and not chunk.causal


def test_a_decode_row_joins_a_shared_call_only_while_it_adds_at_most_the_bound_of_masked_out_pairs() -> None:
    """32 decode rows of 100-131 keys (short histories): several shared calls, not one over all 32 rows."""
    lengths = [100 + row for row in range(32)]
    cu_q, cu_k = list(range(len(lengths) + 1)), [0]
    for length in lengths:
        cu_k.append(cu_k[-1] + length)

    def added(first: int, row: int) -> int:  # row's keys for each row before it, and their keys for row
        return (row - first) * lengths[row] + cu_k[row] - cu_k[first]

    calls = plan_step(cu_q, cu_k, torch.float32)
    assert [(call.q_start, call.k_start) for call in calls[1:]] == [(c.q_end, c.k_end) for c in calls[:-1]]
    assert 1 < len(calls) < len(lengths) and calls[-1].q_end == len(lengths)
    for call in calls:
        assert all(added(call.q_start, row) <= PACK_DECODE_MAX_ADDED_PAIRS for row in range(call.q_start, call.q_end))
        if call.q_end < len(lengths):
            assert added(call.q_start, call.q_end) > PACK_DECODE_MAX_ADDED_PAIRS


def test_a_decode_row_that_adds_exactly_the_bound_joins_and_one_more_pair_does_not() -> None:
    # Row 2 joining row 1 adds its keys for row 1 and row 1's keys for it: 24 + 1,000 pairs, then 24 + 1,001.
    assert PACK_DECODE_MAX_ADDED_PAIRS == 1024
    joined = plan_step([0, 1, 2], [0, 24, 24 + 1000], torch.float32)
    assert [(call.q_start, call.q_end) for call in joined] == [(0, 2)]
    apart = plan_step([0, 1, 2], [0, 24, 24 + 1001], torch.float32)
    assert [(call.q_start, call.q_end) for call in apart] == [(0, 1), (1, 2)]


def test_outside_continuous_batching_it_is_plain_sdpa() -> None:
    torch.manual_seed(1)
    query, key, value = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    expected, _ = sdpa_attention_forward(Layer(), query, key, value, None, is_causal=True)
    got, _ = varlen_sdpa_attention_forward(Layer(), query, key, value, None, is_causal=True)
    torch.testing.assert_close(got, expected)
