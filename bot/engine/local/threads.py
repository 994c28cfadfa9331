"""Torch work off the event loop in threads that end with it, so that the generation thread is the only one that
keeps a pool of OpenMP threads.

GNU OpenMP (libgomp, which PyTorch's CPU builds use) gives each thread that starts a parallel region a pool of worker
threads, kept for that thread's life. Once a process holds more such workers than it has CPUs, every pool throttles
its spin-waiting and sleeps between parallel regions, so each matmul pays for waking its workers. A thread of
`asyncio.to_thread`'s executor that loaded the model (or ran the warm-up step) lives on with its pool, and from then
on every matmul of the generation thread ran about as slowly as on one core: on 2 CPUs, one 8-row linear of SmolLM2
took 150 µs with one pool in the process and 270 µs with two, and `llamacord bench` decoded 8 conversations at 75
tok/s instead of 110 (docs/benchmarks.md). A thread that ends takes its pool along.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

T = TypeVar("T")


async def in_passing_thread(function: Callable[..., T], *args: object, name: str = "llamacord-torch") -> T:
    """`await asyncio.to_thread(function, *args)`, in a new thread that ends when `function` returns."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if result.cancelled():
            return
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(outcome)  # type: ignore[arg-type]  # set only when there is no error

    def run() -> None:
        try:
            outcome = function(*args)
        except BaseException as error:  # handed to the awaiting task, as asyncio.to_thread does
            outcome, failure = None, error
        else:
            failure = None
        with suppress(RuntimeError):  # the loop closed meanwhile (a forced stop): nobody waits for the result
            loop.call_soon_threadsafe(settle, outcome, failure)

    # Not a daemon: like the executor's threads, the interpreter waits for it at exit rather than stopping torch
    # in the middle of its work (which aborts the process).
    threading.Thread(target=run, name=name).start()
    return await result
