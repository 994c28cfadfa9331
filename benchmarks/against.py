"""The server side of `llamacord bench --against URL`: the engine's conversations, streamed from an OpenAI-compatible
server (vLLM, SGLang, llama.cpp's server, `transformers serve`), timed as the engine's are.

- The same prompts: each conversation is sent as the chat messages the engine rendered (after its token budget),
  and the server applies its chat template to them.
- The same decoding and length: temperature 0, top_p 1, `max_tokens` N, plus vLLM's `ignore_eos` and `min_tokens`
  N in the extra body, so a reply runs to N tokens as the engine's do (its model has no EOS id in the benchmark).
  A server that refuses those two fields (`transformers serve` answers 422 to any field it does not know) is asked
  again without them at the warm-up; the refusal is recorded, and every measured request is sent as the warm-up's
  last one was.
- Tokens come from the `usage` the server streams last (`stream_options.include_usage`), never from chunks: vLLM
  sends empty deltas for tokens that decode to no text. A server that stops before N is reported as it is.
- Times run from the call: time to first token is the first chunk with text, end-to-end the end of the stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from time import perf_counter
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI

from benchmarks.timing import PathResult, RequestTiming
from bot.engine.remote import ServedModel, served_model

# A reply queued behind 32 others on a CPU can take minutes; the benchmark waits for it rather than give up first.
REQUEST_TIMEOUT_S = 600.0
WARM_UP_TOKENS = 2
BODY_CHARS = 300


class ServerError(Exception):
    """The server cannot be benchmarked: unreachable, refusing, or replying without what the figures need."""


def length_fields(new_tokens: int) -> dict[str, Any]:
    """vLLM's extra sampling parameters that make a reply run to `new_tokens` whatever the model would end it with."""
    return {"ignore_eos": True, "min_tokens": new_tokens}


def request_options(new_tokens: int, with_length_fields: bool) -> dict[str, Any]:
    """The keyword arguments of every `chat.completions.create` call but the model and the messages."""
    options: dict[str, Any] = {
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": new_tokens,
    }
    if with_length_fields:
        options["extra_body"] = length_fields(new_tokens)
    return options


def describe(error: BaseException) -> str:
    """What went wrong, for a person reading the benchmark's output."""
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error.body or error.message)[:BODY_CHARS]}"
    if isinstance(error, openai.APIConnectionError) and error.__cause__ is not None:
        return f"{error.message} ({type(error.__cause__).__name__}: {error.__cause__})"
    return f"{type(error).__name__}: {error}"


@dataclasses.dataclass(slots=True)
class Server:
    """One OpenAI-compatible server, the model it is asked for, and how its requests are sent."""

    client: AsyncOpenAI
    base_url: str
    model: str
    served: tuple[ServedModel, ...]  # what GET /v1/models listed
    new_tokens: int
    refused: str | None = None  # the server's answer when it refused the length fields; then they are not sent

    @classmethod
    async def connect(cls, base_url: str, model: str | None, new_tokens: int, api_key: str) -> Server:
        """Ask the server what it serves (GET /v1/models) and pick `model`, else the first one it lists."""
        client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=REQUEST_TIMEOUT_S, max_retries=0)
        try:
            served = await _served_models(client)
            return cls(client, base_url, _pick(served, model), served, new_tokens)
        except ServerError:
            await client.close()
            raise

    @property
    def name(self) -> str:
        return f"server ({self.base_url})"

    def options(self) -> dict[str, Any]:
        return request_options(self.new_tokens, with_length_fields=self.refused is None)

    async def warm_up(self, messages: list[dict[str, str]]) -> None:
        """One short request as the measured ones will be sent; when the server refuses the length fields (HTTP 400
        or 422), the same request without them, and the measured requests go without them too."""
        try:
            await self._timed(messages, request_options(WARM_UP_TOKENS, with_length_fields=True))
        except ServerError as error:
            cause = error.__cause__
            if not (isinstance(cause, openai.APIStatusError) and cause.status_code in (400, 422)):
                raise
            await self._timed(messages, request_options(WARM_UP_TOKENS, with_length_fields=False))
            self.refused = describe(cause)

    async def run(self, conversations: Sequence[list[dict[str, str]]], result: PathResult) -> None:
        """All conversations at once, each streamed to the end, as the engine's are; the first failure stops all."""
        options = self.options()
        start = perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._timed(messages, options)) for messages in conversations]
        except* ServerError as errors:
            raise errors.exceptions[0] from None
        result.wall_s += perf_counter() - start
        result.requests.extend(task.result() for task in tasks)

    def row(self, result: PathResult) -> dict[str, Any]:
        """`result`'s summary, and whether the server stopped short of the tokens asked (it ignored the length
        fields, or refused them)."""
        row = result.summary()
        row["fewer_tokens_than_asked"] = row["generated_tokens"] < row["requests"] * self.new_tokens
        return row

    def report(self) -> dict[str, Any]:
        """What the server said about itself and how it was asked, for bench.json."""
        refused = (
            None if self.refused is None else {"fields": list(length_fields(self.new_tokens)), "reply": self.refused}
        )
        return {
            "base_url": self.base_url,
            "model": self.model,
            "models": [dataclasses.asdict(entry) for entry in self.served],
            "request_options": self.options(),
            "refused": refused,
        }

    async def close(self) -> None:
        await self.client.close()

    async def _timed(self, messages: list[dict[str, str]], options: dict[str, Any]) -> RequestTiming:
        start = perf_counter()
        first_text: float | None = None
        usage = None
        try:
            reply = await self.client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]  # plain role/content dicts
                **options,
            )
            async with reply:
                async for chunk in reply:
                    if first_text is None and any(choice.delta.content for choice in chunk.choices):
                        first_text = perf_counter()
                    usage = chunk.usage or usage
        except (openai.OpenAIError, httpx2.TransportError) as error:
            raise ServerError(f"a chat completion failed: {describe(error)}") from error
        end = perf_counter()
        if usage is None:
            raise ServerError(
                "the server streamed no usage (stream_options.include_usage), so its token count is unknown"
            )
        if first_text is None:
            raise ServerError(f"a reply carried no text ({usage.completion_tokens} tokens by its usage)")
        details = usage.prompt_tokens_details
        return RequestTiming(
            ttft_s=first_text - start,
            e2e_s=end - start,
            prompt_tokens=usage.prompt_tokens,
            generated_tokens=usage.completion_tokens,
            cached_prompt_tokens=details.cached_tokens if details is not None else None,
        )


async def _served_models(client: AsyncOpenAI) -> tuple[ServedModel, ...]:
    try:
        page = await client.models.list()
    except openai.OpenAIError as error:
        raise ServerError(f"GET /models failed: {describe(error)}") from error
    return tuple(served_model(entry) for entry in page.data)


def _pick(served: tuple[ServedModel, ...], model: str | None) -> str:
    """`model` if the server lists it; without one, the first the server lists."""
    listed = [entry.id for entry in served]
    if model is None:
        if not listed:
            raise ServerError("GET /models lists no model; name one with --against-model")
        return listed[0]
    if model not in listed:
        raise ServerError(f"the server does not serve {model!r}; it lists {', '.join(listed) or 'none'}")
    return model
