"""`create_engine(settings)`: the engine BACKEND names, started.

Each backend is imported only when chosen, so a bot on `BACKEND=openai` never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.engine.api import Engine
    from bot.settings import Settings


async def create_engine(settings: Settings) -> Engine:
    """The engine BACKEND names, started. Local load failures raise `ModelLoadError`; a remote server that is
    down is not fatal (its requests fail with a clear error until it is back)."""
    if settings.backend == "openai":
        from bot.engine.remote import RemoteEngine

        return await RemoteEngine.from_settings(settings)
    from bot.engine.local.executor import AsyncEngine

    return await AsyncEngine.from_settings(settings)
