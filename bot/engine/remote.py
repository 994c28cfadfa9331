"""`RemoteEngine` (BACKEND=openai): the engine face over an OpenAI-compatible chat-completions server.

vLLM, SGLang, llama.cpp's server, Ollama and `transformers serve` all stream `/v1/chat/completions`; the server owns
the model, its chat template and its batching. This side keeps what makes the bot behave as with the local engine:

- the token budget: `PromptBuilder` trims the conversation (oldest turns first) with the model's tokenizer when it
  loads offline here, else with `EstimatingTokenizer`'s conservative count; the kept messages are what is sent;
- user text never becomes control tokens: every message is `Neutralizer`-ed before it is counted and again as it
  leaves, so special-token text stays text on the server (the server renders the template and reads special tokens
  in the result);
- the busy limit: at most MAX_BATCH_SIZE requests stream from the server at once and MAX_QUEUED_REQUESTS more
  wait for one of those slots; past that, `generate()` raises `EngineBusyError` at once;
- cancellation: each reply is read by a task of its own, so the Stop button (or leaving the loop, or shutdown)
  cancels that task, which closes the HTTP stream; the server sees the disconnect and aborts the generation;
- errors: timeouts, refused connections, 4xx and 5xx replies and errors sent inside the stream end that one
  request with a `GenerationError` whose `str()` is fit for users; the log gets the status and the server's request
  id, and the server's own words only at DEBUG (a server may echo the request's text in them).

No retries: a retry would hold a slot while the user waits on a server that just failed, and a load balancer in
front of several replicas already moves on from a dead one.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI
from openai.types import Model
from openai.types.chat import ChatCompletionChunk

from bot.engine.api import EngineStats, FinishReason, Prompt, RequestTable, StreamBase
from bot.engine.errors import SHUTTING_DOWN, EngineError, GenerationError
from bot.engine.neutralize import Neutralizer
from bot.engine.sampling import SamplingParams
from bot.engine.templating import PromptBuilder, read_chat_template, tokenize_plain
from bot.engine.token_estimate import BYTES_PER_TOKEN, EstimatingTokenizer
from bot.redaction import model_name, public_urls
from bot.settings import Settings

log = logging.getLogger(__name__)

# When neither the server nor a local config says how long the context is, only MAX_PROMPT_TOKENS bounds a prompt.
UNKNOWN_CONTEXT_LENGTH = 1 << 40
# Sent when OPENAI_API_KEY is empty: the client needs some key, and servers started without one ignore it.
NO_API_KEY = "none"
CLOSE_TIMEOUT_S = 5.0
LOGGED_BODY_CHARS = 300


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One entry of the server's `GET /v1/models`."""

    id: str
    max_model_len: int | None  # vLLM and SGLang report the context length they serve; others do not


@dataclass(frozen=True, slots=True)
class RemoteModelInfo:
    """What `/info` shows for a remote model: what the server reports, and how prompts are counted here."""

    base_url: str  # OPENAI_BASE_URL without credentials or query (`public_urls`)
    model: str  # the name requests are sent with (OPENAI_MODEL, else MODEL)
    served: tuple[ServedModel, ...]  # from GET /v1/models; empty when the server could not be asked
    models_error: str | None  # why GET /v1/models failed, or None
    context_length: int | None  # the server's max_model_len, else the local config's, else unknown
    token_counting: str  # "the model's tokenizer (...)" or the estimate
    remote: bool = True

    @property
    def source(self) -> str:
        return f"{model_name(self.model)} (remote, {self.base_url})"

    def lines(self) -> list[str]:
        """Human-readable lines for a terminal or a Discord code block, as `ModelInfo.lines()`; a model the server
        names by a path shows as its last part (`model_name`)."""
        if self.models_error is not None:
            listed = f"unknown ({self.models_error})"
        else:
            listed = ", ".join(model_name(served.id) for served in self.served) or "none"
        context = f"{self.context_length} tokens" if self.context_length else "not reported (MAX_PROMPT_TOKENS)"
        return [
            f"model:          {model_name(self.model)} (remote)",
            f"server:         {self.base_url}",
            f"server models:  {listed}",
            f"context length: {context}",
            f"token counting: {self.token_counting}",
        ]


class RemoteRequestStream(StreamBase):
    """One remote request's text deltas. The HTTP reply is read by the engine's task for this request, so `cancel()`
    from another task closes it at once, even while the consumer waits for a delta."""

    def __init__(self, request_id: str, prompt_tokens: int, abort: Callable[[StreamBase], None]) -> None:
        super().__init__(request_id, prompt_tokens, abort)
        self._pending: list[str] = []  # text received and not yet given to the consumer
        self._task: asyncio.Task[None] | None = None
        self.sent = False  # holds a slot: the request is at the server

    @property
    def running(self) -> bool:
        return self.sent

    async def cancel(self) -> None:
        """Abort the request (the Stop button); returns once the HTTP stream is closed."""
        await super().cancel()
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=CLOSE_TIMEOUT_S)

    def _take(self) -> str:
        text = "".join(self._pending)
        self._pending.clear()
        return text

    def _receive(self, text: str) -> None:
        if self.metrics.ttft_s is None:
            self.metrics.ttft_s = perf_counter() - self._submitted_at
        self._pending.append(text)
        self._wake()


class RemoteEngine:
    """The engine face (prepare, generate, stats, info, tokenize, shutdown) over an OpenAI-compatible server.

    Create it with `await RemoteEngine.from_settings(settings)`; all methods must be called from that loop.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str,
        prompt_builder: PromptBuilder,
        info: RemoteModelInfo,
        max_batch_size: int,
        max_queued_requests: int,
        tokenizer: Any | None = None,
    ) -> None:
        """`tokenizer` is the model's own when it loaded here (for /tokenize and its special tokens), else None."""
        self._requests: RequestTable[RemoteRequestStream] = RequestTable(max_batch_size, max_queued_requests)
        self._client = client
        self._model = model
        self._prompt_builder = prompt_builder
        self._info = info
        self._tokenizer = tokenizer
        self._neutralizer = Neutralizer.for_tokenizer(tokenizer)
        self._slots = asyncio.Semaphore(max_batch_size)
        self._background: set[asyncio.Task[None]] = set()
        self._running = True

    @classmethod
    async def from_settings(cls, settings: Settings) -> RemoteEngine:
        """Connect to OPENAI_BASE_URL. A server that is down now is not fatal: requests fail until it is back."""
        model = (settings.openai_model or settings.model).strip()
        base_url = public_urls(settings.openai_base_url)
        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else NO_API_KEY
        client = AsyncOpenAI(
            base_url=settings.openai_base_url,
            api_key=api_key,
            timeout=settings.openai_timeout_seconds,
            max_retries=0,
        )
        chat_template = None
        if settings.chat_template_path is not None:
            chat_template = await asyncio.to_thread(read_chat_template, settings.chat_template_path)
        local, (served, models_error) = await asyncio.gather(
            asyncio.to_thread(_load_local_tokenizer, model, chat_template is not None),
            _list_models(client),
        )
        if models_error is None and model not in {entry.id for entry in served}:
            log.warning(
                "the server at %s does not list model %r (it lists %s); requests will likely fail",
                base_url,
                model_name(model),
                ", ".join(model_name(entry.id) for entry in served) or "none",
            )
        reported = next((entry.max_model_len for entry in served if entry.id == model), None)
        context_length = reported or (local.context_length if local else None)
        if local is not None:
            tokenizer, counting = local.tokenizer, f"the model's tokenizer ({model_name(model)}, loaded offline)"
        else:
            tokenizer, counting = None, f"estimate, 1 token per {BYTES_PER_TOKEN} UTF-8 bytes (no local tokenizer)"
        builder = PromptBuilder(
            tokenizer or EstimatingTokenizer(),
            max_prompt_tokens=settings.max_prompt_tokens,
            context_length=context_length or UNKNOWN_CONTEXT_LENGTH,
            chat_template=chat_template if tokenizer is not None else None,
        )
        info = RemoteModelInfo(
            base_url=base_url,
            model=model,
            served=served,
            models_error=models_error,
            context_length=context_length,
            token_counting=counting,
        )
        log.info("remote model %s at %s; token counting: %s", model_name(model), base_url, counting)
        return cls(
            client,
            model=model,
            prompt_builder=builder,
            info=info,
            max_batch_size=settings.max_batch_size,
            max_queued_requests=settings.max_queued_requests,
            tokenizer=tokenizer,
        )

    @property
    def info(self) -> RemoteModelInfo:
        return self._info

    @property
    def is_alive(self) -> bool:
        """True until shutdown: a server that is down is the server's health, not the bot's."""
        return self._running

    @property
    def context_length(self) -> int:
        """The most tokens one request may hold: the server's max_model_len (or the local config's, once known)."""
        return self._prompt_builder.context_length

    def stats(self) -> EngineStats:
        return self._requests.stats()

    def tokenize(self, text: str) -> list[tuple[int, str]]:
        """(id, text) of each token, as the local engine gives them; needs the model's tokenizer here."""
        if self._tokenizer is None:
            raise EngineError(
                f"The tokenizer of {self._model} is not available to the bot (the model runs on a remote server)."
            )
        return tokenize_plain(self._tokenizer, text)

    async def prepare(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> Prompt:
        """Neutralise and trim the chat to the token budget, in a worker thread; `Prompt.messages` is what will be
        sent, counted as the server will count it."""

        def build() -> Prompt:
            return self._prompt_builder.build(self._neutralizer.messages(messages), max_new_tokens)

        return await asyncio.to_thread(build)

    def generate(self, prompt: Prompt, params: SamplingParams) -> RemoteRequestStream:
        """Send the request and return its stream at once. Raises `EngineBusyError` at once when the queue is full."""
        if not self._running:
            raise EngineError("The engine is not running.")
        if not prompt.messages:
            raise ValueError("the remote engine needs a Prompt from prepare(), with its messages")
        stream = RemoteRequestStream(f"llamacord-{uuid.uuid4().hex}", prompt.num_tokens, self._abort)
        self._requests.admit(stream)
        # Neutralised again whatever made the Prompt: this is where user text leaves (idempotent, a few ms at most).
        messages = self._neutralizer.messages(prompt.messages)
        stream._task = asyncio.create_task(self._run(stream, messages, params))
        return stream

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish for up to `drain_timeout_s`, fail the rest with
        `GenerationError`, close their HTTP streams and the client."""
        if not self._running:
            return
        self._running = False
        tasks = [stream._task for stream in self._requests if stream._task is not None]
        await self._requests.drain(drain_timeout_s)
        for stream in self._requests.fail_all(GenerationError(SHUTTING_DOWN)):
            if stream._task is not None:
                stream._task.cancel()
        for task in self._background:
            task.cancel()
        pending = [task for task in [*tasks, *self._background] if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
        await self._client.close()

    def _abort(self, stream: StreamBase) -> None:
        stream._finish(FinishReason.CANCELLED)
        self._requests.pop(stream.request_id)
        task = stream._task if isinstance(stream, RemoteRequestStream) else None
        if task is not None:
            task.cancel()

    async def _run(self, stream: RemoteRequestStream, messages: list[dict[str, str]], params: SamplingParams) -> None:
        """Wait for a slot, stream the reply into `stream`, and end it with its finish reason or a user-fit error."""
        try:
            async with self._slots:
                stream.metrics.queue_wait_s = perf_counter() - stream._submitted_at
                stream.sent = True
                reply = await self._client.chat.completions.create(
                    model=self._model,
                    messages=messages,  # type: ignore[arg-type]  # plain role/content dicts
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    extra_headers={"X-Request-Id": stream.request_id},
                )
                async with reply:
                    reason = FinishReason.STOP
                    async for chunk in reply:
                        reason = _read_chunk(stream, chunk) or reason
            stream._finish(reason)
            if self._info.models_error is not None:
                self._refresh_info_soon()
        except asyncio.CancelledError:
            stream._finish(FinishReason.CANCELLED)
            raise
        except openai.OpenAIError as error:
            _log_failure(logging.ERROR, f"remote request {stream.request_id} failed", error)
            stream._finish(FinishReason.ERROR, GenerationError(user_message(error)))
        except httpx2.TransportError as error:  # mid-stream the client does not wrap these in its own errors
            log.error("remote request %s lost its connection: %r", stream.request_id, error)
            stream._finish(FinishReason.ERROR, GenerationError(transport_message(error)))
        except Exception as error:
            # Its message may quote the reply (a validation error shows the chunk): at ERROR its type and where it was
            # raised, which find a bug of ours as well; the message and traceback only at DEBUG.
            frame = traceback.extract_tb(error.__traceback__)[-1]
            log.error(
                "remote request %s failed on an unexpected reply: %s at %s:%s (%s)",
                stream.request_id,
                type(error).__name__,
                frame.filename,
                frame.lineno,
                frame.name,
            )
            log.debug("remote request %s: the unexpected reply", stream.request_id, exc_info=True)
            stream._finish(FinishReason.ERROR, GenerationError("The model server sent a reply the bot cannot read."))
        finally:
            self._requests.pop(stream.request_id)

    def _refresh_info_soon(self) -> None:
        """The server was down when the engine started and answers now: ask it again what it serves."""
        if self._background:
            return

        async def refresh() -> None:
            served, error = await _list_models(self._client)
            if error is not None:
                return
            reported = next((entry.max_model_len for entry in served if entry.id == self._model), None)
            if reported is not None:
                self._prompt_builder.context_length = reported
            context_length = reported or self._info.context_length
            self._info = replace(self._info, served=served, models_error=None, context_length=context_length)

        task = asyncio.create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _read_chunk(stream: RemoteRequestStream, chunk: ChatCompletionChunk) -> FinishReason | None:
    """Record one chunk; its finish reason, if it carries one."""
    reason: FinishReason | None = None
    for choice in chunk.choices:
        content = getattr(choice.delta, "content", None)  # servers may leave the delta out of the last chunk
        if content:
            stream._receive(content)
            stream.metrics.generated_tokens += 1  # one token a chunk, until the server's usage says better
        if choice.finish_reason is not None:
            reason = FinishReason.LENGTH if choice.finish_reason == "length" else FinishReason.STOP
    if chunk.usage is not None:
        stream.metrics.prompt_tokens = chunk.usage.prompt_tokens
        stream.metrics.generated_tokens = chunk.usage.completion_tokens
        details = chunk.usage.prompt_tokens_details  # vLLM (--enable-prompt-tokens-details) and others report this
        if details is not None and details.cached_tokens:
            stream.metrics.cached_prompt_tokens = details.cached_tokens
    return reason


TIMED_OUT = "The model server took too long to answer. Please try again in a moment."
UNREACHABLE = "The model server can't be reached right now. Please try again in a moment."


def transport_message(error: httpx2.TransportError) -> str:
    """A short message for a connection that failed or dropped mid-reply."""
    return TIMED_OUT if isinstance(error, httpx2.TimeoutException) else UNREACHABLE


def user_message(error: openai.OpenAIError) -> str:
    """A short message for the user; `_log_failure` gives the log the details."""
    if isinstance(error, openai.APITimeoutError):
        return TIMED_OUT
    if isinstance(error, openai.APIConnectionError):
        return UNREACHABLE
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status in (401, 403):
            return f"The model server refused the bot's credentials (HTTP {status}). An admin needs to check them."
        if status in (429, 503):
            return f"The model server is overloaded (HTTP {status}). Please try again in a moment."
        if status < 500:
            return f"The model server refused the request (HTTP {status}). An admin can find why in the bot's log."
        return f"The model server failed (HTTP {status}). Please try again in a moment."
    return "The model server stopped with an error. Please try again."


def _log_failure(level: int, what: str, error: openai.OpenAIError) -> None:
    """`what` failed: the status, the server's request id or the connection error at `level`; the server's own words
    only at DEBUG, cut short: some servers echo the request in them, and message content is only logged at DEBUG."""
    words = _server_words(error)
    hint = "; the server's answer is logged at DEBUG" if words else ""
    log.log(level, "%s: %s%s", what, _describe(error), hint)
    if words:
        log.debug("%s: the server answered: %s", what, words[:LOGGED_BODY_CHARS])


def _describe(error: openai.OpenAIError) -> str:
    """What may be logged at any level: no text from the server."""
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code} (server request id {error.request_id})"
    if isinstance(error, openai.APIConnectionError):  # the client's own words, and the connection's error
        cause = f" ({error.__cause__!r})" if error.__cause__ is not None else ""
        return f"{type(error).__name__}: {error.message}{cause}"
    return type(error).__name__


def _server_words(error: openai.OpenAIError) -> str | None:
    """The server's error body or message, if it sent one."""
    if isinstance(error, openai.APIConnectionError) or not isinstance(error, openai.APIError):
        return None
    return str(error.body or error.message)


async def _list_models(client: AsyncOpenAI) -> tuple[tuple[ServedModel, ...], str | None]:
    """GET /v1/models: what the server serves, or why it could not say."""
    try:
        page = await client.models.list()
    except openai.OpenAIError as error:
        _log_failure(logging.WARNING, "cannot list the server's models", error)
        return (), user_message(error)
    return tuple(served_model(entry) for entry in page.data), None


def served_model(entry: Model) -> ServedModel:
    """One `GET /v1/models` entry; vLLM and SGLang add the context length they serve as `max_model_len`."""
    max_model_len = (entry.model_extra or {}).get("max_model_len")
    return ServedModel(
        id=entry.id,
        max_model_len=max_model_len if isinstance(max_model_len, int) and max_model_len > 0 else None,
    )


@dataclass(frozen=True, slots=True)
class _LocalTokenizer:
    tokenizer: Any
    context_length: int | None


def _load_local_tokenizer(model: str, has_template: bool) -> _LocalTokenizer | None:
    """The model's tokenizer if it loads without the network (a local directory, or the Hugging Face cache) and
    can render a chat; else None, and the estimate counts instead. Blocking: run it in a thread."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as error:  # not cached, not a directory, gated, corrupt: all mean "estimate instead"
        log.info("no local tokenizer for %s (%s); prompts are budgeted with an estimate", model, error)
        return None
    if not (has_template or getattr(tokenizer, "chat_template", None)):
        log.warning("the local tokenizer of %s has no chat template; prompts are budgeted with an estimate", model)
        return None
    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        context_length = getattr(config.get_text_config(), "max_position_embeddings", None)
    except Exception:
        context_length = None
    return _LocalTokenizer(tokenizer, context_length)
