"""How large the paged KV cache is: KV_CACHE_MEMORY, or `auto`.

The cache is sized by memory, not by the worst case (every batch slot holding a full-length conversation, which on a
CPU machine asked for more memory than it had, and on a GPU capped concurrency far below what it could hold).

- A size (`2GiB`, `512MiB`) is that many bytes of keys and values.
- `auto` on CUDA leaves the sizing to transformers' continuous batching with `CUDA_MEMORY_SHARE` of the memory left
  after the weights (vLLM's `gpu_memory_utilization` is the model), minus what a batch's activations need.
- `auto` on a CPU takes `CPU_AVAILABLE_SHARE` of the memory the machine has available, at most `CPU_AUTO_MAX_BYTES`
  (a CPU machine runs other things too), and never more than `AUTO_MAX_BATCHES` full batches of the longest requests:
  room for the running batch and for the cached prefixes of other channels' conversations, no more.

The executor admits a request only when the cache has room for all of it (prompt and `max_new_tokens`), so when the
cache is full new requests wait their turn and the running ones are never cut short or recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import psutil
import torch

CUDA_MEMORY_SHARE = 0.9
CPU_AVAILABLE_SHARE = 0.25
CPU_AUTO_MAX_BYTES = 2 * 2**30
AUTO_MAX_BATCHES = 4
# Pages: flash attention's paged kernels need 256 tokens. A CPU has no flash attention, and prefix sharing reuses
# whole pages only, so 16-token pages let requests share the cached pages of a short system prompt.
CUDA_PAGE_SIZE = 256
CPU_PAGE_SIZE = 16


def page_size_for(device: torch.device) -> int:
    return CUDA_PAGE_SIZE if device.type == "cuda" else CPU_PAGE_SIZE


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token takes in the cache, over every layer."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def planned_blocks(memory: int | str, model: Any, *, worst_case_tokens: int) -> int | None:
    """The number of cache pages KV_CACHE_MEMORY asks for; None leaves the sizing to continuous batching (`auto` on
    CUDA, from the memory left after the weights). `worst_case_tokens`: a full batch of the longest requests."""
    device = model.device
    page = page_size_for(device)
    if memory != "auto":
        return max(1, int(memory) // kv_bytes_per_token(model) // page)
    if device.type == "cuda":
        return None
    budget = min(int(psutil.virtual_memory().available * CPU_AVAILABLE_SHARE), CPU_AUTO_MAX_BYTES)
    return max(
        1, min(budget // kv_bytes_per_token(model) // page, math.ceil(AUTO_MAX_BATCHES * worst_case_tokens / page))
    )


@dataclass(frozen=True, slots=True)
class KVCacheInfo:
    """The cache as it was allocated, for the start-up log, `/info` and `llamacord info`."""

    tokens: int
    page_size: int
    bytes: int
    longest_request: int  # MAX_PROMPT_TOKENS + MAX_NEW_TOKENS, within the model's context

    @property
    def conversations(self) -> int:
        """How many conversations of the longest length the cache holds at once."""
        return self.tokens // self.longest_request

    def describe(self) -> str:
        conversations = f"{self.conversations} conversation{'' if self.conversations == 1 else 's'}"
        return (
            f"{self.tokens:,} tokens in {self.tokens // self.page_size:,} pages of {self.page_size} "
            f"({self.bytes / 2**30:.2f} GiB): {conversations} of {self.longest_request:,} tokens"
        )


def blocks_for(tokens: int, page_size: int) -> int:
    """Pages a request of `tokens` tokens may take (one more for the page a step may open ahead)."""
    return math.ceil(tokens / page_size) + 1
