"""The engine face the bot types against, and `create_engine(settings)`, which picks it with BACKEND.

Two backends have that face: `AsyncEngine` (BACKEND=local, the model in this process) and `RemoteEngine`
(BACKEND=openai, an OpenAI-compatible server). The Discord adapter, the terminal and the metrics use only what
is below, so they need not know which one runs. Each backend is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bot.engine.executor import EngineStats, RequestMetrics
    from bot.engine.sampling import SamplingParams
    from bot.engine.templating import Prompt
    from bot.settings import Settings


class EngineInfo(Protocol):
    """What `/info` and `llamacord chat` read: `ModelInfo` (local) or `RemoteModelInfo` (remote)."""

    @property
    def source(self) -> str: ...

    def lines(self) -> list[str]: ...


class TextStream(Protocol):
    """One request's text deltas. Leaving the loop, or cancelling its task, aborts it; errors are `EngineError`s."""

    @property
    def metrics(self) -> RequestMetrics: ...

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def cancel(self) -> None: ...


class Engine(Protocol):
    """The engine face. `generate` raises `EngineBusyError` at once when full; every error's `str()` is user-fit.

    `tokenize` may raise `EngineError` when the backend has no tokenizer (a remote model whose tokenizer is not
    available locally).
    """

    @property
    def info(self) -> EngineInfo: ...

    @property
    def is_alive(self) -> bool: ...  # can still generate (not shut down); /healthz reports it

    async def prepare(self, messages: Sequence[dict[str, str]], max_new_tokens: int) -> Prompt: ...

    def generate(self, prompt: Prompt, params: SamplingParams) -> TextStream: ...

    def stats(self) -> EngineStats: ...

    def tokenize(self, text: str) -> list[tuple[int, str]]: ...

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None: ...


async def create_engine(settings: Settings) -> Engine:
    """The engine BACKEND names, started. Local load failures raise `ModelLoadError`; a remote server that is
    down is not fatal (its requests fail with a clear error until it is back)."""
    if settings.backend == "openai":
        from bot.engine.remote import RemoteEngine

        return await RemoteEngine.from_settings(settings)
    from bot.engine.executor import AsyncEngine

    return await AsyncEngine.from_settings(settings)
