"""The only module that touches transformers' continuous-batching API (pinned: transformers==5.24.0).

Every internal it uses is listed in `internals_problems()`, checked when the batcher starts: an upgrade that moves
one fails at start-up with a message naming it, never silently in a request.

`ContinuousBatchingManager` runs the model in its own thread: a paged KV cache, a FIFO scheduler that lets a new
request join the running batch at the next step, chunked prefill, prefix sharing, and per-request temperature and
top_p through its per-request logits processors. This adapter keeps what it does and covers what it lacks:

- Routing. Its `register_result_handler` must be registered before `add_request` (or early tokens land in a queue
  nobody reads), and it is only dropped on a final event, which `cancel_request` never sends, so every cancelled
  request would leak a handler. We replace its `OutputRouter` instead: every output of a step crosses to the event
  loop in one `call_soon_threadsafe`, and outputs of requests the engine no longer tracks are dropped there.
  `get_result`, which starves other requests by re-queueing them, is never used.
- Greedy per request. The manager samples or argmaxes for all requests at once. We sample and swap its per-request
  temperature processor for one that treats temperature 0 as greedy: it keeps only the argmax logit, so sampling
  returns exactly the token `generate(do_sample=False)` would.
- Recovery. An exception in a step ends the manager's loop: it fails every request in flight (we get them as
  failed outputs) and refuses new ones. We then restart the loop from a short-lived thread, holding requests
  submitted meanwhile in a backlog that the new loop receives first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch
import transformers.integrations.sdpa_attention
from transformers import AttentionInterface, ContinuousBatchingConfig, GenerationConfig, PreTrainedModel
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators.cache_allocator import BlockLedger
from transformers.generation.continuous_batching.cache_allocators.cache_pool import CachePool
from transformers.generation.continuous_batching.cache_allocators.full_attention import FullAttentionCacheAllocator
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.continuous_api import (
    BackgroundThreadStatus,
    ContinuousBatchingManager,
    OutputRouter,
)
from transformers.generation.continuous_batching.input_outputs import ContinuousBatchingIOs
from transformers.generation.continuous_batching.model_runner import ModelRunner
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus
from transformers.generation.continuous_batching.utils import WorkloadHints
from transformers.generation.logits_process import TemperatureLogitsWarper
from transformers.masking_utils import AttentionMaskInterface

from bot.engine.local.attention import SDPA, AttentionChoice
from bot.engine.local.kv_cache import CUDA_MEMORY_SHARE, page_size_for
from bot.engine.local.varlen_sdpa import CB_VARLEN_SDPA, register_varlen_sdpa
from bot.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

PINNED = "transformers==5.24.0"

# The manager only builds its per-request processors when its own defaults differ from "off" (temperature 1,
# top_p 1). These placeholders are never used: every request passes its own temperature and top_p.
_PLACEHOLDER_TEMPERATURE = 0.5
_PLACEHOLDER_TOP_P = 0.5
# Under memory pressure the scheduler evicts cached prefix pages until this much more than its safety margin is free,
# oldest released first, this many pages at a time; transformers would drop every cached page at once.
EVICTION_SLACK = 0.05
EVICTION_PAGES = 16


class TransformersChanged(RuntimeError):
    """transformers' continuous batching is not shaped as in the pinned release: an upgrade, not a setting, to fix."""


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """What one step produced for one request. `token_ids` is every token generated so far, stop token included."""

    request_id: str
    token_ids: list[int]
    started_at: float | None  # perf_counter() when the scheduler first took the request, None if it never did
    done: bool
    error: str | None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (known once the scheduler took it)


class _GreedyAwareTemperature(ContinuousBatchingTemperatureLogitsWarper):
    """Per-request temperature where 0 means greedy. Vectorised over the batch: no Python work per request."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temperatures = tensor_arg[: scores.size(0)].view(dtype=torch.float32).unsqueeze(-1)  # [B, 1]
        greedy = temperatures == 0
        scaled = scores / torch.where(greedy, torch.ones_like(temperatures), temperatures)
        best = scores.argmax(dim=-1, keepdim=True)
        only_best = torch.full_like(scores, -math.inf).scatter_(-1, best, 0.0)
        return torch.where(greedy, only_best, scaled)


class _SkippableTopP(ContinuousBatchingTopPLogitsWarper):
    """Top-p that costs nothing when no request in the batch filters (greedy requests are submitted with top_p 1:
    the argmax survives any top-p). Otherwise it sorts the whole [batch, vocab] scores, ~3-15 ms a step on a CPU."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if bool((tensor_arg[: scores.size(0)].view(dtype=torch.float32) >= 1).all()):
            return scores
        return super().__call__(scores, tensor_arg)


def _sample_or_argmax(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
    """The manager's sampling step (do_sample, no logprobs), skipping `multinomial` (~8 ms a step on a CPU for
    8 × 49k) when every row is one-hot, as greedy rows are after `_GreedyAwareTemperature`."""
    probs = torch.nn.functional.softmax(scores[0], dim=-1)  # [num_logits, vocab]
    if bool((probs.amax(dim=-1) == 1).all()):
        next_tokens = probs.argmax(dim=-1)
    else:
        next_tokens = torch.multinomial(probs, num_samples=1).squeeze(-1)
    output_ids[0, : next_tokens.size(0)].copy_(next_tokens)


class _LoopRouter(OutputRouter):
    """Sends each step's outputs to the event loop in one call. Runs on the generation thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Callable[[list[GenerationOutput]], None]) -> None:
        super().__init__()
        self._loop = loop
        self._sink = sink

    def deliver(self, output: GenerationOutput) -> None:
        self.deliver_batch([output])

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._sink, outputs)
        except RuntimeError:  # the event loop is closed: nobody is left to read these outputs
            log.debug("dropped %d outputs: the event loop is closed", len(outputs))


@dataclass(frozen=True, slots=True)
class _Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class ContinuousBatcher:
    """Owns one `ContinuousBatchingManager` for one model. Call `submit`/`cancel` from the event loop only."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: Sequence[int],
        max_batch_size: int,
        cache_blocks: int | None,
        longest_request: int,
        max_batch_tokens: int,
        attention: AttentionChoice,
        on_updates: Callable[[list[TokenUpdate]], None],
    ) -> None:
        """`cache_blocks` pages of `page_size_for(device)` tokens, or None to size the cache from free GPU memory."""
        self._model = model
        self._attention = attention
        self._eos_token_ids = list(eos_token_ids)
        self._max_batch_size = max_batch_size
        self._cache_blocks = cache_blocks
        self._longest_request = longest_request
        self._max_batch_tokens = max_batch_tokens
        self._on_updates = on_updates
        self.page_size = page_size_for(model.device)
        self.cache_tokens = 0  # known once started
        self._cached_tokens: dict[str, int] = {}  # request id -> prompt tokens the prefix cache served
        self._manager: ContinuousBatchingManager | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # guards the restart state below against the restart thread
        self._backlog: list[_Submission] = []
        self._restart_thread: threading.Thread | None = None
        self._closing = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Build the manager, allocate the KV cache and start the generation thread. Blocking: run it off the loop."""
        problems = internals_problems()
        if problems:
            raise TransformersChanged(
                f"bot/engine/local/cb_adapter.py is written for {PINNED}, and this transformers differs: "
                + "; ".join(problems)
            )
        self._loop = loop
        # On a CPU: each request attends to its own keys only (varlen_sdpa; the fallback SDPA takes grouped KV heads
        # without copying them), and an all-greedy step skips top-p's sort and the multinomial draw (host-side
        # checks, free on a CPU only).
        cpu = self._model.device.type == "cpu"
        if cpu:
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        varlen = self._attention.implementation == CB_VARLEN_SDPA
        # The manager accepts only sdpa, paged|eager and flash attention: varlen SDPA is switched to after it.
        wanted = SDPA if varlen else self._attention.implementation
        if self._model.config._attn_implementation != wanted:
            self._model.set_attn_implementation(wanted)
        cb_config = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=self._cache_blocks,
            max_memory_percent=CUDA_MEMORY_SHARE,
            max_batch_tokens=self._max_batch_tokens,
            max_requests_per_batch=self._max_batch_size,
            per_request_processors=True,
            auto_switch_to_flash=False,  # the attention is chosen (and logged) by `choose_attention`
            use_cuda_graph=self._attention.cuda_graphs,
        )
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=_PLACEHOLDER_TEMPERATURE,
            top_p=_PLACEHOLDER_TOP_P,
            eos_token_id=self._eos_token_ids,
        )
        # Sizes the decode fast path's block table; a longer request still runs, on the general (varlen) path.
        hints = WorkloadHints(max_prompt_length=self._longest_request, num_requests=self._max_batch_size)
        manager = self._model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config, workload_hints=hints
        )
        _install_greedy_temperature(manager)
        if cpu:
            _install_skippable_top_p(manager)
        manager.output_router = _LoopRouter(loop, self._dispatch)
        if varlen:
            # After the manager accepted sdpa and before warmup builds the batch processor, which then allocates no
            # cache-sized attention mask for an implementation it does not know.
            register_varlen_sdpa()
            self._model.set_attn_implementation(CB_VARLEN_SDPA)
        manager.warmup()  # builds the cache and batch processor now, so a bad size fails here and not in a request
        if cpu:
            _install_sample_or_argmax(manager)
        cache = _cache_of(manager)
        _install_read_slots_as_tensors(manager, cache)
        _count_cached_prompt_tokens(cache, self._cached_tokens)
        _install_lru_eviction(cache, manager.batch_processor.scheduler.safety_margin)  # type: ignore[union-attr]
        self.cache_tokens = cache.num_blocks * self.page_size
        manager.start()
        self._manager = manager

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Never blocks: the manager's input queue is unbounded (the engine bounds it)."""
        submission = _Submission(request_id, prompt_ids, params)
        with self._lock:
            if self._restart_thread is not None:
                self._backlog.append(submission)
            elif not self._add(submission):
                self._backlog.append(submission)
                self._begin_restart()

    def cancel(self, request_id: str) -> None:
        """Abort a request. The manager frees its cache at the start of its next step and sends no final output."""
        with self._lock:
            self._backlog = [s for s in self._backlog if s.request_id != request_id]
        self._cached_tokens.pop(request_id, None)
        self._require_manager().cancel_request(request_id)

    def stop(self) -> None:
        """Stop the generation thread; requests still in it fail. Blocking: run it off the loop."""
        with self._lock:
            self._closing = True
            restart_thread = self._restart_thread
        if restart_thread is not None:
            restart_thread.join()
        if self._manager is not None:
            self._manager.stop(block=True, hard_stop=True)

    @property
    def running(self) -> bool:
        """Whether the generation thread runs (or is being restarted after a failure) and `stop` was not called."""
        manager = self._manager
        return not self._closing and manager is not None and (self._restart_thread is not None or manager.is_running())

    def _require_manager(self) -> ContinuousBatchingManager:
        if self._manager is None:
            raise RuntimeError("ContinuousBatcher.start() has not been called")
        return self._manager

    def _add(self, submission: _Submission) -> bool:
        params = submission.params
        request_id = self._require_manager().add_request(
            submission.prompt_ids,
            request_id=submission.request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=True,
            eos_token_id=self._eos_token_ids,
            temperature=params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
        )
        return request_id is not None  # None: the loop died and refuses requests until it is restarted

    def _dispatch(self, outputs: list[GenerationOutput]) -> None:
        """Runs on the event loop, once per step."""
        cached = self._cached_tokens
        updates = [
            TokenUpdate(
                request_id=output.request_id,
                token_ids=output.generated_tokens,
                started_at=output.lifespan[0] if output.lifespan[0] > 0 else None,
                done=output.is_finished(),
                error=output.error if output.status == RequestStatus.FAILED else None,
                cached_tokens=(cached.pop if output.is_finished() else cached.get)(output.request_id, 0),
            )
            for output in outputs
        ]
        self._on_updates(updates)
        if any(update.error is not None for update in updates):
            with self._lock:
                self._begin_restart()

    def _begin_restart(self) -> None:
        """Restart the loop if it died. Called with the lock held, which `_restart` holds until the new loop runs,
        so a late failure of the dead loop cannot restart the new one."""
        died = self._require_manager().background_thread_status.local_status >= BackgroundThreadStatus.HARD_STOP
        if died and self._restart_thread is None and not self._closing:
            self._restart_thread = threading.Thread(target=self._restart, name="llamacord-cb-restart", daemon=True)
            self._restart_thread.start()

    def _restart(self) -> None:
        manager = self._require_manager()
        manager.join(perf_counter())  # the dying loop has already failed its requests; this waits for its exit
        with self._lock:
            self._restart_thread = None
            if self._closing:
                return
            backlog, self._backlog = self._backlog, []
            log.warning("restarting the generation loop after a failure")
            try:
                manager.start()
                refused = [submission for submission in backlog if not self._add(submission)]
            except Exception as error:
                log.exception("the generation loop could not be restarted")
                refused, reason = backlog, f"the generation loop could not be restarted: {error}"
            else:
                reason = "the generation loop refused the request after a restart"
            if refused and self._loop is not None:  # nothing else will ever report on them: their streams would hang
                failures = [TokenUpdate(s.request_id, [], started_at=None, done=True, error=reason) for s in refused]
                with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
                    self._loop.call_soon_threadsafe(self._on_updates, failures)


def _install_greedy_temperature(manager: ContinuousBatchingManager) -> None:
    processors: Any = manager.logit_processor.logits_processor
    for index, processor in enumerate(processors):
        if type(processor) is ContinuousBatchingTemperatureLogitsWarper:
            processors[index] = _GreedyAwareTemperature(TemperatureLogitsWarper(processor.temperature))
            return
    raise TransformersChanged(
        f"transformers' continuous batching built no per-request temperature processor ({PINNED})"
    )


def _install_skippable_top_p(manager: ContinuousBatchingManager) -> None:
    processors: Any = manager.logit_processor.logits_processor
    for index, processor in enumerate(processors):
        if type(processor) is ContinuousBatchingTopPLogitsWarper:
            skippable = _SkippableTopP.__new__(_SkippableTopP)
            skippable.__dict__.update(processor.__dict__)
            processors[index] = skippable
            return
    raise TransformersChanged(f"transformers' continuous batching built no per-request top-p processor ({PINNED})")


def _install_sample_or_argmax(manager: ContinuousBatchingManager) -> None:
    """After `warmup`, which builds the batch processor and its model runner."""
    processor = manager.batch_processor
    if processor is None or not isinstance(getattr(processor, "model_runner", None), ModelRunner):
        raise TransformersChanged(f"transformers' continuous batching built no model runner after warmup ({PINNED})")
    if processor.return_logprobs:
        raise RuntimeError("the sampling shortcut does not return logprobs; the batcher never asks for them")
    processor.model_runner._sample = _sample_or_argmax  # type: ignore[method-assign]


def _cache_of(manager: ContinuousBatchingManager) -> PagedAttentionCache:
    processor = manager.batch_processor
    cache = getattr(processor, "cache", None)
    if not isinstance(cache, PagedAttentionCache):
        raise TransformersChanged(f"transformers' continuous batching built no paged cache after warmup ({PINNED})")
    return cache


def _install_read_slots_as_tensors(manager: ContinuousBatchingManager, cache: PagedAttentionCache) -> None:
    """Build each step's cache read indices from the requests' page tables with a few tensor operations, instead of
    transformers' Python list of one int per cached token of every request in the step, converted by `torch.tensor`
    (about 0.1 µs an int). Ten 3,900-token prompts arriving together spent ~2 ms of every ~30 ms step there, for the
    decode rows of the prompts already answered, whose whole history is read at every step. The indices are the same
    (tests compare them with transformers' own). Write indices, at most one step's new tokens, stay transformers'.
    Only for full-attention caches and the synchronous IOs; the others keep transformers' lists."""
    ios = getattr(manager.batch_processor, "inputs_and_outputs", None)
    allocators = list(cache.cache_allocators.values())
    if type(ios) is not ContinuousBatchingIOs or any(type(a) is not FullAttentionCacheAllocator for a in allocators):
        return
    missing = [name for name in _IO_STORAGE if not hasattr(ios, name)]
    missing += [f"allocator.{name}" for name in _PAGE_TABLE if not all(hasattr(a, name) for a in allocators)]
    if missing:
        raise TransformersChanged(f"transformers' continuous batching lost {', '.join(missing)} ({PINNED})")
    spans: list[tuple[str, int, int]] = []  # (request id, 0, past + query length) of the step being prepared
    preparing = [False]  # reads are left out of transformers' lists only inside the wrapped preparation
    extend = cache.extend_read_and_write_indices

    def extend_read_and_write_indices(
        request_id: str, past_length: int, query_length: int, read_index: list[list[int]] | None, write_index: Any
    ) -> None:
        if not preparing[0]:
            extend(request_id, past_length, query_length, read_index, write_index)
            return
        extend(request_id, past_length, query_length, None, write_index)
        if read_index is not None:  # None: the step reads nothing from the cache
            spans.append((request_id, 0, past_length + query_length))

    prepare = ios.prepare_batch_tensors

    def prepare_batch_tensors(*args: Any, **kwargs: Any) -> None:
        spans.clear()
        preparing[0] = True
        try:
            prepare(*args, **kwargs)
        finally:
            preparing[0] = False
        if spans and not ios.use_block_table:  # the decode fast path fills a block table instead
            for index, allocator in enumerate(allocators):
                read = cache_slots(allocator, spans)
                ios.read_index_storage[index, : read.numel()] = read
                ios.true_read_sizes[index] = read.numel()

    cache.extend_read_and_write_indices = extend_read_and_write_indices  # type: ignore[method-assign]
    ios.prepare_batch_tensors = prepare_batch_tensors  # type: ignore[method-assign]


_IO_STORAGE = ("use_block_table", "read_index_storage", "true_read_sizes")
_PAGE_TABLE = ("block_table", "tokens_per_page", "block_physical_stride")


def cache_slots(allocator: FullAttentionCacheAllocator, spans: Sequence[tuple[str, int, int]]) -> torch.Tensor:
    """The cache rows of token positions [start, end) of each request, in order: what transformers'
    `get_read_indices` (start 0) and `get_write_indices` (start = past length) return, concatenated. Python touches
    one int per page, not one per token: every page's rows at once, then each request's slice of them."""
    page, stride = allocator.tokens_per_page, allocator.block_physical_stride
    blocks: list[int] = []
    pieces: list[tuple[int, int]] = []
    for request_id, start, end in spans:
        first, last = start // page, (end - 1) // page
        head = len(blocks) * page + start - first * page
        blocks.extend(allocator.block_table[request_id][first : last + 1])
        pieces.append((head, head + end - start))
    rows = (torch.tensor(blocks)[:, None] * stride + torch.arange(page)).view(-1)
    return torch.cat([rows[start:end] for start, end in pieces])


def _count_cached_prompt_tokens(cache: PagedAttentionCache, counts: dict[str, int]) -> None:
    """Record, per request, how many prompt tokens the prefix cache served. The scheduler asks the cache once per new
    request, before scheduling it (and again with its generated tokens if it is ever recomputed: the first answer is
    the one that counts). Runs on the generation thread, before the request's first output is delivered."""
    search = cache.search_prefix_match

    def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:
        matched = search(request_id, prompt_ids)
        counts.setdefault(request_id, matched)
        return matched

    cache.search_prefix_match = search_prefix_match  # type: ignore[method-assign]


def _install_lru_eviction(cache: PagedAttentionCache, safety_margin: float) -> None:
    """Evict cached prefix pages oldest first, only as many as bring the free share back above the scheduler's
    safety margin. transformers evicts every cached page at once, which under a steady load would cool every
    channel's prefix cache at the same moment, again and again. A page is cached when no request holds it any more,
    and taken back out when one shares it again, so the ledger's order is the order pages were last released."""
    target = safety_margin + EVICTION_SLACK

    def evict_cached_blocks() -> bool:
        evicted = False
        for allocator in cache.cache_allocators.values():
            ledger: BlockLedger = allocator.ledger
            while ledger.cached_blocks and cache.compute_free_capacity() < target:
                oldest = list(itertools.islice(ledger.cached_blocks, EVICTION_PAGES))
                for block in oldest:
                    del ledger.cached_blocks[block]
                    ledger.hash_to_block.pop(ledger.block_to_hash.pop(block))
                cache.pool.free_blocks(allocator.index, oldest)
                cache.pool.try_to_free_sectors()
                evicted = True
        return evicted

    cache.evict_cached_blocks = evict_cached_blocks  # type: ignore[method-assign]


def internals_problems() -> list[str]:
    """What of transformers' continuous-batching internals this module uses is missing or changed shape ([] when
    all is as in the pinned release). The names and parameters below are exactly those the code above uses."""
    problems: list[str] = []

    def parameters(owner: object, name: str, *expected: str, keywords: bool = False) -> None:
        member = getattr(owner, name, None)
        where = f"{getattr(owner, '__qualname__', owner)}.{name}"
        if not callable(member):
            problems.append(f"{where} is gone")
            return
        found = inspect.signature(member).parameters
        missing = [parameter for parameter in expected if parameter not in found]
        if missing:
            problems.append(f"{where} lost its parameters {', '.join(missing)}")
        if keywords and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in found.values()):
            problems.append(f"{where} no longer takes per-request keyword arguments (temperature, top_p)")

    def fields(owner: type, *expected: str) -> None:
        found = {field.name for field in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else set()
        missing = [name for name in expected if name not in found]
        if missing:
            problems.append(f"{owner.__qualname__} lost its fields {', '.join(missing)}")

    manager = ContinuousBatchingManager
    parameters(
        manager, "add_request", "input_ids", "request_id", "max_new_tokens", "streaming", "eos_token_id", keywords=True
    )
    parameters(manager, "cancel_request", "request_id")
    parameters(manager, "stop", "block", "hard_stop")
    parameters(manager, "join", "stop_trigger_time")
    for method in ("start", "warmup", "is_running"):
        parameters(manager, method)
    parameters(OutputRouter, "deliver", "output")
    parameters(OutputRouter, "deliver_batch", "outputs")
    fields(GenerationOutput, "request_id", "generated_tokens", "lifespan", "status", "error")
    parameters(GenerationOutput, "is_finished")
    fields(
        ContinuousBatchingConfig,
        "page_size",
        "num_blocks",
        "max_batch_tokens",
        "max_requests_per_batch",
        "per_request_processors",
    )
    fields(WorkloadHints, "max_prompt_length", "num_requests")
    parameters(ContinuousBatchingTemperatureLogitsWarper, "__call__", "scores", "tensor_arg")
    parameters(ContinuousBatchingTopPLogitsWarper, "__call__", "scores", "tensor_arg")
    parameters(ModelRunner, "_sample", "scores", "output_ids")
    parameters(PagedAttentionCache, "search_prefix_match", "request_id", "prompt_ids")
    parameters(PagedAttentionCache, "evict_cached_blocks")
    parameters(PagedAttentionCache, "compute_free_capacity")
    parameters(
        PagedAttentionCache, "extend_read_and_write_indices", "request_id", "past_length", "query_length", "read_index"
    )
    parameters(ContinuousBatchingIOs, "prepare_batch_tensors", "requests_in_batch", "max_kv_read")
    parameters(CachePool, "free_blocks", "index", "block_ids")
    parameters(CachePool, "try_to_free_sectors")
    parameters(PreTrainedModel, "set_attn_implementation", "attn_implementation")
    parameters(AttentionInterface, "register")
    parameters(AttentionMaskInterface, "register")
    parameters(transformers.integrations.sdpa_attention, "sdpa_attention_forward", "module", "query", "attention_mask")
    ledger = BlockLedger()
    for attribute in ("cached_blocks", "hash_to_block", "block_to_hash"):
        if not isinstance(getattr(ledger, attribute, None), dict):
            problems.append(f"BlockLedger.{attribute} is no longer a dict")
    if not hasattr(RequestStatus, "FAILED"):
        problems.append("RequestStatus.FAILED is gone")
    if not hasattr(BackgroundThreadStatus, "HARD_STOP"):
        problems.append("BackgroundThreadStatus.HARD_STOP is gone")
    return problems
