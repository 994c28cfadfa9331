"""`in_passing_thread`: torch work in a thread that ends with it, so no pool of OpenMP threads outlives the work."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.engine.local import executor
from bot.engine.local.cb_adapter import ContinuousBatcher
from bot.engine.local.executor import AsyncEngine
from bot.engine.local.threads import in_passing_thread
from bot.settings import Settings
from tests.support.local_engine import TIMEOUT_S


async def test_it_returns_the_result_from_a_thread_that_is_gone_afterwards() -> None:
    ran_on: list[threading.Thread] = []

    def work(a: int, b: int) -> int:
        ran_on.append(threading.current_thread())
        return a + b

    assert await asyncio.wait_for(in_passing_thread(work, 2, 3), 5) == 5
    [thread] = ran_on
    assert thread is not threading.main_thread()
    await asyncio.wait_for(asyncio.to_thread(thread.join, 5), 6)
    assert not thread.is_alive()
    assert await asyncio.wait_for(in_passing_thread(work, 1, 1), 5) == 2
    assert ran_on[1] is not thread  # a new thread each time, not a pool's


async def test_it_raises_what_the_function_raised() -> None:
    def fail() -> None:
        raise MemoryError("the KV cache does not fit")

    with pytest.raises(MemoryError, match="does not fit"):
        await asyncio.wait_for(in_passing_thread(fail), 5)


async def test_the_engine_loads_and_warms_up_in_threads_that_are_gone_when_it_serves(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the generation thread may keep an OpenMP pool: not the event loop, not an executor thread."""
    used: list[threading.Thread] = []

    def recorded(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            used.append(threading.current_thread())
            return function(*args)

        return call

    monkeypatch.setattr(executor, "load_model", recorded(executor.load_model))
    monkeypatch.setattr(ContinuousBatcher, "start", recorded(ContinuousBatcher.start))
    settings = Settings(_env_file=None, model=str(tiny_model_dir), device="cpu", kv_cache_memory="1MiB")  # type: ignore[call-arg]
    engine = await asyncio.wait_for(AsyncEngine.from_settings(settings), TIMEOUT_S)
    try:
        assert len(used) == 2
        for thread in used:
            await asyncio.wait_for(asyncio.to_thread(thread.join, TIMEOUT_S), TIMEOUT_S + 1)
            assert not thread.is_alive() and thread is not threading.main_thread()
    finally:
        await engine.shutdown()
