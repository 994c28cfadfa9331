"""`AsyncEngine`: the local engine, the async face of the one executor that owns the model (`bot.engine.api`).

The model runs on the continuous-batching thread behind `cb_adapter`; this module runs on the event loop only and
never touches the model. Each generation step reaches the loop as one callback carrying every request's new tokens;
a stream only records them and wakes its consumer, which decodes whatever has arrived when it next reads, so a slow
consumer decodes a few tokens at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Literal, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bot.engine.api import EngineStats, FinishReason, Prompt, RequestTable, StreamBase
from bot.engine.errors import SHUTTING_DOWN, EngineError, GenerationError, ModelLoadError
from bot.engine.local.attention import AttentionChoice, choose_attention
from bot.engine.local.cb_adapter import ContinuousBatcher, TokenUpdate, TransformersChanged
from bot.engine.local.detokenizer import IncrementalDetokenizer
from bot.engine.local.info import ModelInfo, collect_model_info
from bot.engine.local.kv_cache import KVCacheInfo, blocks_for, kv_bytes_per_token, page_size_for, planned_blocks
from bot.engine.local.loader import load_model
from bot.engine.local.threads import in_passing_thread
from bot.engine.sampling import SamplingParams
from bot.engine.templating import PromptBuilder, tokenize_plain
from bot.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 2048


class _HasTokenIds(Protocol):
    @property
    def token_ids(self) -> Sequence[int]: ...


class RequestStream(StreamBase):
    """One local request's text deltas. The generation thread's updates only record token ids and wake the consumer,
    which decodes whatever has arrived when it next reads."""

    def __init__(
        self,
        request_id: str,
        *,
        prompt_tokens: int,
        eos_token_ids: frozenset[int],
        detokenizer: IncrementalDetokenizer,
        abort: Callable[[StreamBase], None],
    ) -> None:
        super().__init__(request_id, prompt_tokens, abort)
        self._eos_token_ids = eos_token_ids
        self._detokenizer = detokenizer
        self._token_ids: list[int] = []
        self._decoded = 0  # how many of _token_ids the detokenizer has seen

    @property
    def token_ids(self) -> list[int]:
        """Every generated token id so far, the stop token included (as `generate` returns them)."""
        return list(self._token_ids)

    @property
    def running(self) -> bool:
        return bool(self._token_ids)

    def _take(self) -> str:
        end = len(self._token_ids)
        if self.metrics.finish_reason is FinishReason.STOP:
            end -= 1  # the EOS token is not text
        if end <= self._decoded:
            return ""
        new_ids = self._token_ids[self._decoded : end]
        self._decoded = end
        return self._detokenizer.push(new_ids)

    def _flush(self) -> str:
        return self._detokenizer.flush()

    def _apply(self, update: TokenUpdate, now: float) -> None:
        """Record one step's output. Runs on the event loop, inside the per-step callback: keep it O(1)."""
        if update.started_at is not None and self.metrics.queue_wait_s is None:
            self.metrics.queue_wait_s = max(0.0, update.started_at - self._submitted_at)
        if update.cached_tokens:
            self.metrics.cached_prompt_tokens = update.cached_tokens
        if update.token_ids and not self._token_ids:
            self.metrics.ttft_s = now - self._submitted_at
        self._token_ids = update.token_ids
        self.metrics.generated_tokens = len(update.token_ids)
        if update.error is not None:
            self._finish(FinishReason.ERROR, GenerationError("Generation failed. Please try again."), now)
        elif update.done:
            stopped = bool(update.token_ids) and update.token_ids[-1] in self._eos_token_ids
            self._finish(FinishReason.STOP if stopped else FinishReason.LENGTH, None, now)
        self._wake()


@dataclass(slots=True)
class _Pending:
    """A request the engine accepted but has not handed to the batcher: it waits for room in the cache."""

    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    blocks: int  # cache pages reserved for it once admitted: its prompt and all its new tokens


class AsyncEngine:
    """Owns the model for the whole process. Create it on the event loop, then `await start()` (or use
    `from_settings`). All methods must be called from that loop.

    Requests go to the batcher in arrival order, each once the cache has room for all of it (its prompt and
    `max_new_tokens`), and at most `max_batch_size` at a time: when the cache is full, new requests wait here and
    the running ones are never cut short or recomputed for lack of room.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int,
        max_queued_requests: int,
        max_sequence_tokens: int | None = None,
        cache_tokens: int | Literal["auto"] | None = None,
        longest_request: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        attention: AttentionChoice | None = None,
        prompt_builder: PromptBuilder | None = None,
        info: ModelInfo | None = None,
    ) -> None:
        """`max_sequence_tokens` caps prompt + max_new_tokens of one request (default: the model's context length).
        `cache_tokens` sizes the paged KV cache: a number of tokens, "auto" (CUDA: from the memory left after the
        weights), or None for a full batch of the longest requests. `longest_request` (default: the longest
        sequence) is the request the cache must hold at least one of; `/info` counts the cache in those. `attention`
        defaults to the fastest the device and the installed packages allow (`choose_attention`)."""
        self._requests: RequestTable[RequestStream] = RequestTable(max_batch_size, max_queued_requests)
        context_length = _context_length(model)
        self._max_sequence_tokens = min(max_sequence_tokens or context_length, context_length)
        self._longest_request = min(longest_request or self._max_sequence_tokens, self._max_sequence_tokens)
        if cache_tokens is None:
            cache_tokens = max_batch_size * self._max_sequence_tokens
        self._tokenizer = tokenizer
        self._eos_token_ids = frozenset(_eos_token_ids(model))
        self._prompt_builder = prompt_builder
        self._info = info
        self._kv_bytes_per_token = kv_bytes_per_token(model)
        self._ids = itertools.count()
        self._state = "new"  # new -> running -> closed
        self._pending: deque[_Pending] = deque()  # accepted, waiting for room in the cache
        self._admitted: dict[str, int] = {}  # request id -> cache pages reserved, for requests given to the batcher
        page_size = page_size_for(model.device)
        self.attention = attention if attention is not None else choose_attention(model)
        self._batcher = ContinuousBatcher(
            model,
            eos_token_ids=sorted(self._eos_token_ids),
            max_batch_size=max_batch_size,
            cache_blocks=None if cache_tokens == "auto" else max(1, int(cache_tokens) // page_size),
            longest_request=self._longest_request,
            max_batch_tokens=max_batch_tokens,
            attention=self.attention,
            on_updates=self._on_updates,
        )
        if cache_tokens != "auto":
            self._check_cache_holds_a_request(int(cache_tokens) // page_size * page_size)

    @classmethod
    async def from_settings(cls, settings: Settings) -> AsyncEngine:
        """Load the model named by MODEL in a worker thread and start the executor with the cache KV_CACHE_MEMORY
        sizes."""
        loaded = await in_passing_thread(load_model, settings)
        info = await in_passing_thread(collect_model_info, loaded)
        context_length = _context_length(loaded.model)
        longest_request = min(settings.max_prompt_tokens + settings.max_new_tokens, context_length)
        blocks = planned_blocks(
            settings.kv_cache_memory, loaded.model, worst_case_tokens=settings.max_batch_size * longest_request
        )
        page_size = page_size_for(loaded.model.device)
        engine = cls(
            loaded.model,
            loaded.tokenizer,
            max_batch_size=settings.max_batch_size,
            max_queued_requests=settings.max_queued_requests,
            cache_tokens="auto" if blocks is None else blocks * page_size,
            longest_request=longest_request,
            # Budget within what one request may hold here, so a channel's larger max_new_tokens shortens the
            # prompt instead of failing every message.
            prompt_builder=PromptBuilder(
                loaded.tokenizer,
                max_prompt_tokens=settings.max_prompt_tokens,
                context_length=min(context_length, longest_request if blocks is None else blocks * page_size),
            ),
            info=info,
        )
        await engine.start()
        log.info("attention: %s; KV cache: %s", engine.attention.describe(), engine.kv_cache.describe())
        return engine

    async def start(self) -> None:
        """Allocate the KV cache and start the generation thread (off the loop)."""
        if self._state != "new":
            raise EngineError("The engine was already started.")
        starting = asyncio.ensure_future(in_passing_thread(self._batcher.start, asyncio.get_running_loop()))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:  # stopped during start-up: the thread goes on, so stop what it starts
            with contextlib.suppress(Exception):
                await starting
            await in_passing_thread(self._batcher.stop)
            raise
        except TransformersChanged as error:  # no setting fixes this one
            raise ModelLoadError(f"The executor could not start: {error}") from error
        except (MemoryError, RuntimeError, ValueError) as error:  # the KV cache does not fit, or a bad size
            raise ModelLoadError(
                f"The executor could not start: {error}. Lower KV_CACHE_MEMORY, MAX_BATCH_SIZE or MAX_PROMPT_TOKENS."
            ) from error
        self._state = "running"
        try:
            self._check_cache_holds_a_request(self._batcher.cache_tokens)
        except ModelLoadError:
            await self.shutdown()
            raise
        # A request longer than the whole cache could never be scheduled: `generate` refuses it.
        self._max_sequence_tokens = min(self._max_sequence_tokens, self._batcher.cache_tokens)
        if self._prompt_builder is not None:
            self._prompt_builder.context_length = min(self._prompt_builder.context_length, self._max_sequence_tokens)

    def _check_cache_holds_a_request(self, cache_tokens: int) -> None:
        if cache_tokens < self._longest_request:
            raise ModelLoadError(
                f"The KV cache holds {cache_tokens:,} tokens, less than one request of MAX_PROMPT_TOKENS + "
                f"MAX_NEW_TOKENS ({self._longest_request:,} tokens). Raise KV_CACHE_MEMORY (at "
                f"{self._kv_bytes_per_token:,} bytes a token, one request needs "
                f"{self._longest_request * self._kv_bytes_per_token / 2**20:,.0f} MiB), or lower MAX_PROMPT_TOKENS or "
                "MAX_NEW_TOKENS."
            )

    async def __aenter__(self) -> AsyncEngine:
        if self._state == "new":
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineError("This engine was built without model info.")
        running = self._state == "running"
        return dataclasses.replace(
            self._info, kv_cache=self.kv_cache if running else None, attention=self.attention.describe()
        )

    @property
    def kv_cache(self) -> KVCacheInfo:
        tokens = self._batcher.cache_tokens
        return KVCacheInfo(tokens, self._batcher.page_size, tokens * self._kv_bytes_per_token, self._longest_request)

    @property
    def is_alive(self) -> bool:
        """Started, not shut down, and its generation thread running: what /healthz reports as engine_alive."""
        return self._state == "running" and self._batcher.running

    @property
    def context_length(self) -> int:
        """The most tokens one request (prompt + reply) may hold: the model's context, within what the cache and
        MAX_PROMPT_TOKENS + MAX_NEW_TOKENS allow."""
        if self._prompt_builder is not None:
            return self._prompt_builder.context_length
        return self._max_sequence_tokens

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    def stats(self) -> EngineStats:
        return self._requests.stats()

    def tokenize(self, text: str) -> list[tuple[int, str]]:
        """(id, text) of each token, reading control-token look-alikes as plain text, as user messages are read."""
        return tokenize_plain(self._tokenizer, text)

    async def prepare(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Prompt:
        """Render the chat within the token budget, in a worker thread (templating is CPU work)."""
        if self._prompt_builder is None:
            raise EngineError("This engine was built without a prompt builder.")
        return await asyncio.to_thread(self._prompt_builder.build, list(messages), max_new_tokens)

    def generate(self, prompt: _HasTokenIds | Sequence[int], params: SamplingParams) -> RequestStream:
        """Accept a request and return its stream at once. Raises `EngineBusyError` at once when the queue is full."""
        if self._state != "running":
            raise EngineError("The engine is not running.")
        prompt_ids = [int(token_id) for token_id in _token_ids(prompt)]
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        length = len(prompt_ids) + params.max_new_tokens
        if length > self._max_sequence_tokens:
            raise GenerationError(
                f"The prompt ({len(prompt_ids)} tokens) plus {params.max_new_tokens} new tokens is longer than "
                f"this engine allows ({self._max_sequence_tokens} tokens)."
            )
        self._requests.check_room()
        stream = RequestStream(
            f"req-{next(self._ids)}",
            prompt_tokens=len(prompt_ids),
            eos_token_ids=self._eos_token_ids,
            detokenizer=IncrementalDetokenizer(self._tokenizer),
            abort=self._abort,
        )
        self._requests.admit(stream)  # before submitting, so no output of this request can be missed
        blocks = min(blocks_for(length, self._batcher.page_size), self._cache_blocks)
        self._pending.append(_Pending(stream, prompt_ids, params, blocks))
        self._admit()
        return stream

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish for up to `drain_timeout_s`, fail the rest with
        `GenerationError`, and stop the generation thread."""
        if self._state == "closed":
            return
        was_running, self._state = self._state == "running", "closed"
        if was_running:
            await self._requests.drain(drain_timeout_s)
        # Fail what is left before stopping the thread, so the thread's own failure outputs find no stream.
        self._pending.clear()
        self._requests.fail_all(GenerationError(SHUTTING_DOWN))
        if was_running:
            await in_passing_thread(self._batcher.stop)

    @property
    def _cache_blocks(self) -> int:
        return self._batcher.cache_tokens // self._batcher.page_size

    def _admit(self) -> None:
        """Hand waiting requests to the batcher, in order, while the cache and the batch have room."""
        reserved = sum(self._admitted.values())
        while (
            self._pending
            and len(self._admitted) < self._requests.max_batch_size
            and reserved + self._pending[0].blocks <= self._cache_blocks
        ):
            pending = self._pending.popleft()
            self._admitted[pending.stream.request_id] = pending.blocks
            reserved += pending.blocks
            self._batcher.submit(pending.stream.request_id, pending.prompt_ids, pending.params)

    def _release(self, request_id: str) -> None:
        if self._admitted.pop(request_id, None) is not None and self._state == "running":
            self._admit()

    def _abort(self, stream: StreamBase) -> None:
        stream._finish(FinishReason.CANCELLED, None)
        if self._requests.pop(stream.request_id) is None:
            return
        if stream.request_id in self._admitted:
            self._batcher.cancel(stream.request_id)
            self._release(stream.request_id)
        else:
            self._pending = deque(p for p in self._pending if p.stream is not stream)

    def _on_updates(self, updates: list[TokenUpdate]) -> None:
        """One call per generation step, on the event loop."""
        now = perf_counter()
        for update in updates:
            stream = self._requests.get(update.request_id)
            if stream is None:
                if not update.done:
                    # Cancelled, but the cancellation reached the scheduler before the request did and was lost.
                    self._batcher.cancel(update.request_id)
                continue
            stream._apply(update, now)
            if stream.finished:
                self._requests.pop(update.request_id)
                self._release(update.request_id)
                if update.error is not None:
                    log.error("request %s failed: %s", update.request_id, update.error)


def _token_ids(prompt: _HasTokenIds | Sequence[int]) -> Sequence[int]:
    token_ids = getattr(prompt, "token_ids", None)
    return prompt if token_ids is None else token_ids  # type: ignore[return-value]


def _context_length(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _eos_token_ids(model: PreTrainedModel) -> list[int]:
    """Every EOS id of the model (Llama 3.2 has three), from its generation config, else its config."""
    for config in (model.generation_config, model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    raise EngineError("The model defines no EOS token, so generation could never stop early.")
