"""One lock per channel, under which its messages are decided and answered in arrival order."""

from __future__ import annotations

import asyncio
import weakref


class ChannelLocks:
    """The lock under which one channel's messages are decided and answered, in arrival order (asyncio locks are
    FIFO), and `/reset` clears its history, so a message that arrives while the channel is being answered waits
    its turn. A lock exists only while in use: unused ones are dropped with their last reference."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, channel_id: int) -> asyncio.Lock:
        lock = self._locks.get(channel_id)
        if lock is None:
            lock = self._locks[channel_id] = asyncio.Lock()
        return lock
