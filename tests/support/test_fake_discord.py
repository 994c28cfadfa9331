"""The fake Discord itself, driven by a bare discord.py client: if these fail, the bot's e2e tests mean nothing."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import discord
import pytest
import yarl

from tests.support.fake_discord import BOT_TOKEN, FakeDiscord, FakeFile, running

pytestmark = pytest.mark.asyncio(loop_scope="session")


@contextmanager
def pointed_at(fake: FakeDiscord) -> Iterator[None]:
    old_base, old_gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = fake.api_base_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway


def bare_client() -> tuple[discord.Client, asyncio.Queue[discord.Message]]:
    """A plain discord.py client, and the messages it receives."""
    seen: asyncio.Queue[discord.Message] = asyncio.Queue()
    intents = discord.Intents.default()
    intents.message_content = True
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)

    @client.event
    async def on_message(message: discord.Message) -> None:
        await seen.put(message)

    return client, seen


async def test_bare_client_logs_in_receives_events_and_posts() -> None:
    client, seen = bare_client()
    async with FakeDiscord() as fake:
        with pointed_at(fake):
            async with running(client):
                guild = client.get_guild(fake.guild_id)
                assert guild is not None and guild.get_channel(fake.general_id) is not None
                assert guild.get_thread(fake.thread_id) is not None
                identify = next(e for e in fake.gateway_events if e["op"] == 2)
                assert identify["d"]["token"] == BOT_TOKEN

                sent = await fake.send_message(fake.alice, "hello", mention_bot=True)
                async with asyncio.timeout(5):
                    message = await seen.get()
                assert message.id == int(sent["id"]) and client.user in message.mentions
                assert message.author.display_name == "Alice"

                reply = await message.reply("hi back", mention_author=False)
                call = await fake.wait_for_call("POST", f"/channels/{fake.general_id}/messages")
                assert call.json["content"] == "hi back"
                assert int(call.json["message_reference"]["message_id"]) == message.id
                # The fake echoes the bot's own message back over the gateway, as Discord does.
                async with asyncio.timeout(5):
                    echoed = await seen.get()
                assert echoed.id == reply.id and echoed.author == client.user

                edited = await reply.edit(content="edited")
                assert edited.content == "edited" and fake.messages[reply.id]["content"] == "edited"
                patch = await fake.wait_for_call("PATCH", re.compile(rf"/channels/{fake.general_id}/messages/\d+"))
                assert patch.json["content"] == "edited"


async def test_wait_for_call_times_out_with_a_clear_error() -> None:
    async with FakeDiscord() as fake:
        with pytest.raises(AssertionError, match=re.escape("timed out after 0.05s waiting for GET /nothing")):
            await fake.wait_for_call("GET", "/nothing", timeout_s=0.05)


async def test_more_than_the_global_limit_in_a_second_is_answered_as_discord_does() -> None:
    async with FakeDiscord(global_limit=3) as fake, aiohttp.ClientSession() as session:
        bot = {"Authorization": f"Bot {BOT_TOKEN}"}
        url = f"{fake.api_base_url}/users/@me"
        statuses = []
        for _ in range(4):
            async with session.get(url, headers=bot) as response:
                statuses.append(response.status)
                last, headers = await response.json(), response.headers
        assert statuses == [200, 200, 200, 429]
        assert last["message"] == "You are being rate limited." and last["global"] is True
        assert 0 < last["retry_after"] <= 1.0
        assert headers["X-RateLimit-Global"] == "true" and headers["X-RateLimit-Scope"] == "global"
        assert int(headers["Retry-After"]) >= last["retry_after"] and "Via" in headers
        assert [call.path for call in fake.rate_limited] == ["/users/@me"]
        assert fake.peak_rate() == 4  # the rejected request was sent too

        # Interaction callbacks are not bound by the global limit; a request after the window has passed is fine.
        async with session.post(f"{fake.api_base_url}/interactions/1/unknown/callback", json={}) as response:
            assert response.status != 429
        await asyncio.sleep(last["retry_after"])
        async with session.get(url, headers=bot) as response:
            assert response.status == 200


async def test_the_global_limit_can_be_turned_off() -> None:
    async with FakeDiscord(global_limit=None) as fake, aiohttp.ClientSession() as session:
        for _ in range(60):
            async with session.get(f"{fake.api_base_url}/users/@me", headers={"Authorization": f"Bot {BOT_TOKEN}"}):
                pass
        assert fake.rate_limited == [] and fake.peak_rate() == 60


async def test_discord_py_waits_out_a_global_429_and_retries() -> None:
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    async with FakeDiscord(global_limit=3) as fake:
        with pointed_at(fake):
            async with running(client):
                channel = client.get_channel(fake.general_id)
                assert isinstance(channel, discord.TextChannel)
                start = len(fake.calls)
                async with asyncio.timeout(10):
                    sent = await asyncio.gather(*(channel.send(f"message {i}") for i in range(8)))
        assert len({message.id for message in sent}) == 8
        assert fake.rate_limited, "8 requests at once under a limit of 3 a second were never refused"
        assert fake.peak_rate(after=start) > 3  # sent: the 429s count here ...
        refused = {id(call) for call in fake.rate_limited}
        accepted = [call.time for call in fake.calls[start:] if call.global_scope and id(call) not in refused]
        # ... but no more than 3 were accepted in any second.
        assert all(sum(t <= other < t + 1 for other in accepted) <= 3 for t in accepted)


async def test_attachments_are_discords_objects_served_by_the_cdn_as_the_test_chooses() -> None:
    client, seen = bare_client()
    files = [
        FakeFile("notes.txt", b"hello", "text/plain; charset=utf-8"),
        FakeFile("gone.txt", b"x", status=404),
        FakeFile("broken.txt", b"x", status=500),
        FakeFile("slow.txt", b"late", delay_s=30),
    ]
    async with FakeDiscord() as fake:
        with pointed_at(fake):
            async with running(client):
                await fake.send_message(fake.alice, "", attachments=files)
                async with asyncio.timeout(5):
                    message = await seen.get()
                notes, gone, broken, slow = message.attachments
                assert (notes.filename, notes.size, notes.content_type) == ("notes.txt", 5, "text/plain; charset=utf-8")
                assert gone.content_type is None and fake.cdn_fetches == []
                assert await notes.read() == b"hello"
                with pytest.raises(discord.NotFound):
                    await gone.read()
                with pytest.raises(discord.HTTPException) as failed:
                    await broken.read()
                assert failed.value.status == 500
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await slow.read()
                assert fake.cdn_fetches == [notes.id, gone.id, broken.id, slow.id]
        # Closing the fake ends the slow answer still pending, instead of waiting the 30 s out.
