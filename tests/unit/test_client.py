"""`pace_requests`: which of the bot's REST requests is which in the pacer, on discord.py's own `HTTPClient` methods
(so a route template that changes in discord.py shows up here)."""

from __future__ import annotations

import asyncio
from typing import Any

import discord
from discord.http import HTTPClient, Route, handle_message_parameters

from bot.client import pace_requests
from bot.cogs.replying import RETRY_PREFIX, STOP_PREFIX
from bot.pacing import Pacer


def paced_http() -> HTTPClient:
    """discord.py's client with pacing at 200 requests a second, sending nothing: `sent` lists what went out."""
    client = HTTPClient(asyncio.get_running_loop())
    client.sent = []  # type: ignore[attr-defined]

    async def send(route: Route, **kwargs: Any) -> Any:
        client.sent.append(f"{route.method} {route.channel_id}")  # type: ignore[attr-defined]
        return kwargs

    client.request = send  # type: ignore[method-assign]
    pace_requests(client, Pacer(200.0))
    return client


async def test_messages_go_before_edits_that_waited_longer() -> None:
    http = paced_http()
    await http.get_user(1)  # takes the turn now: the next ones wait in line
    text = handle_message_parameters(content="hi")
    requests = [http.edit_message(1, 10, params=text), http.edit_message(2, 20, params=text)]
    requests += [http.send_message(3, params=text)]
    async with asyncio.timeout(5):
        await asyncio.gather(*requests)
    assert http.sent == ["GET None", "POST 3", "PATCH 1", "PATCH 2"]  # type: ignore[attr-defined]


async def test_the_edit_that_ends_a_reply_goes_before_streaming_edits() -> None:
    http = paced_http()
    await http.get_user(1)
    stop, retry = discord.ui.View(timeout=None), discord.ui.View(timeout=None)
    stop.add_item(discord.ui.Button(label="Stop", custom_id=f"{STOP_PREFIX}7"))
    retry.add_item(discord.ui.Button(label="Retry", custom_id=f"{RETRY_PREFIX}7"))
    streaming = handle_message_parameters(content="so far", view=stop)
    growing = handle_message_parameters(content="so far, and more")  # the components left as they are
    done = handle_message_parameters(content="the end", view=None)  # the button comes off: the reply is done
    retried = handle_message_parameters(content="the end", view=retry)  # or Retry takes Stop's place
    async with asyncio.timeout(5):
        await asyncio.gather(
            http.edit_message(1, 10, params=streaming),
            http.edit_message(2, 20, params=growing),
            http.edit_message(3, 30, params=done),
            http.edit_message(4, 40, params=retried),
        )
    assert http.sent == ["GET None", "PATCH 3", "PATCH 4", "PATCH 1", "PATCH 2"]  # type: ignore[attr-defined]


async def test_a_request_goes_through_unchanged() -> None:
    http = paced_http()
    sent = await http.send_message(3, params=handle_message_parameters(content="hi"))
    assert sent["json"]["content"] == "hi"


async def test_typing_goes_only_when_no_request_waits() -> None:
    http = paced_http()
    await http.send_typing(1)
    waiting = asyncio.create_task(http.edit_message(2, 20, params=handle_message_parameters(content="hi")))
    await asyncio.sleep(0)
    assert await http.send_typing(3) is None
    await asyncio.wait_for(waiting, timeout=1)
    assert http.sent == ["POST 1", "PATCH 2"]  # type: ignore[attr-defined]
