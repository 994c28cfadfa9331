"""A fake Discord on 127.0.0.1: REST v10 and the JSON gateway, for end-to-end tests with the real discord.py client.

One aiohttp app serves both halves on a random port:

- REST under `/api/v10`: the endpoints discord.py calls (login, application info, command sync, messages, typing,
  interaction callbacks and webhooks). Every call is recorded as a `RestCall` (method, path, query, JSON body,
  time) before it is answered, and `wait_for_call` / `wait_until` let a test wait for one, always with a timeout.
- The gateway at `/gateway`: HELLO, IDENTIFY → READY, then GUILD_CREATE with one guild (roles, two text channels,
  a thread, the bot's member), heartbeat ACKs; tests push MESSAGE_CREATE and INTERACTION_CREATE with
  `send_message`, `slash` (in a guild channel, the bot's DM, or a group DM) and `press_button`. Messages the bot
  posts come back to it as MESSAGE_CREATE, as on Discord, so "the bot ignores itself" is exercised for real.
- Sharding as Discord does it: an IDENTIFY with `shard: [id, count]` gets READY and GUILD_CREATE for the guilds of
  that shard only (`(guild_id >> 22) % count == id`), and each event goes to the shard of its guild (direct
  messages to shard 0). `add_guild` adds guilds, placed on a chosen shard if the test wants.
- Discord's limits: a message body whose content is over 2,000 characters, or whose embeds break an embed limit
  (title 256, description 4,096, field name 256, field value 1,024, 6,000 in all), is answered 400 with Discord's
  "Invalid Form Body" error (code 50035) and listed in `rejected`, so no test passes with what Discord would refuse.
- Discord's global rate limit: more than `global_limit` (default 50, Discord's) requests authenticated with the
  bot token in any one second are answered 429 as Discord answers them (`"global": true`, `retry_after`, the
  `X-RateLimit-Global`, `X-RateLimit-Scope` and `Retry-After` headers, and `Via`, by which discord.py tells
  Discord's 429 from a Cloudflare ban) and listed in `rate_limited`; `peak_rate` is the most such requests in any
  one second. Interaction callbacks and webhooks authenticate with their token instead and do not count, as on
  Discord. `global_limit=None` turns the limit off.
- Deferred interaction responses as Discord has them: the first follow-up after a deferral replaces the loading
  message and keeps the deferral's visibility (its own ephemeral flag is ignored).
- Deletions and edits as Discord sends them: `delete_message` and `bulk_delete` remove messages and send
  MESSAGE_DELETE / MESSAGE_DELETE_BULK (ids only, as the raw events carry them); an edit of a deleted message is
  answered 404 "Unknown Message". `edit_message` (a user's edit) and every edit the bot makes send MESSAGE_UPDATE
  with the whole message. Reactions the bot adds are kept in `reactions`.
- Channel permissions: `add_channel(..., bot_denied=SEND_MESSAGES)` gives the bot a member overwrite that denies
  those bits, and a post there is answered 403 "Missing Permissions", as Discord does.
- Attachments as Discord's CDN serves them: `send_message(..., attachments=[FakeFile(...)])` gives the message
  Discord's attachment objects, whose `url` is `/attachments/{channel}/{id}/{filename}` on this same server, which
  answers with the bytes and their Content-Type (or, as the test chooses, late or with an error status). Every fetch
  is kept in `cdn_fetches`, so a test can tell a file was never downloaded.

Permissions are the test's to choose: a `FakeUser` has role ids (the moderator role carries Manage Guild and
Manage Messages), and an interaction's `member.permissions` is computed from them unless the test passes its own.

Discord details discord.py depends on: responses carry `Content-Type: application/json` exactly (discord.py
compares the header, so aiohttp's `; charset=utf-8` would turn every body into a string), and interaction
callbacks arrive with `?with_response=1` and need a JSON `InteractionCallback` body back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord
from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
DEFAULT_TIMEOUT = 10.0
BOT_TOKEN = "fake-token"

# Permission bits (https://discord.com/developers/docs/topics/permissions).
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
READ_MESSAGE_HISTORY = 1 << 16
USE_APPLICATION_COMMANDS = 1 << 31
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 53) - 1
EVERYONE_PERMISSIONS = (
    VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | READ_MESSAGE_HISTORY | USE_APPLICATION_COMMANDS
) | SEND_MESSAGES_IN_THREADS
MODERATOR_PERMISSIONS = MANAGE_GUILD | MANAGE_MESSAGES

# Gateway opcodes and the interaction types the fake understands.
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_RESUME, OP_HELLO, OP_HEARTBEAT_ACK = 0, 1, 2, 6, 10, 11
INTERACTION_COMMAND, INTERACTION_COMPONENT = 2, 3
CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE, CALLBACK_UPDATE = 4, 5, 7  # 6 (deferred update) needs no message
MESSAGE_DEFAULT, MESSAGE_REPLY = 0, 19
CHANNEL_TEXT, CHANNEL_DM, CHANNEL_GROUP_DM, CHANNEL_PUBLIC_THREAD = 0, 1, 3, 11
CONTEXT_GUILD, CONTEXT_BOT_DM, CONTEXT_PRIVATE_CHANNEL = 0, 1, 2  # an interaction's `context`
OPTION_ROLE = 8  # a slash command option's type
SNOWFLAKE_OPTIONS = (6, 7, OPTION_ROLE, 9, 11)  # user, channel, role, mentionable, attachment
EPHEMERAL_FLAG = 1 << 6
LOADING_FLAG = 1 << 7  # a deferred response's "thinking…" message

# Discord's length limits on a message and its embeds (https://discord.com/developers/docs/resources/message).
CONTENT_LIMIT = 2000
EMBED_LIMITS = {"title": 256, "description": 4096}
EMBED_FIELD_LIMITS = {"name": 256, "value": 1024}
EMBED_TOTAL_LIMIT = 6000  # titles, descriptions, field names and values, footer texts and author names, all embeds
INVALID_FORM_BODY = 50035
UNKNOWN_MESSAGE, MISSING_PERMISSIONS = 10008, 50013
# Discord's global rate limit: requests per bot token in any window of this many seconds.
GLOBAL_LIMIT = 50
GLOBAL_WINDOW_S = 1.0


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def json_response(payload: Any, status: int = 200) -> web.Response:
    """A JSON response whose Content-Type is exactly `application/json`, as Discord's (and discord.py checks)."""
    return web.Response(status=status, body=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})


def _too_long(limit: int) -> dict[str, Any]:
    return {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {limit} or fewer in length."}]}


def _embed_size(embed: dict[str, Any]) -> int:
    texts = [embed.get("title"), embed.get("description"), (embed.get("footer") or {}).get("text")]
    texts += [(embed.get("author") or {}).get("name")]
    texts += [f.get(key) for f in embed.get("fields") or [] for key in EMBED_FIELD_LIMITS]
    return sum(len(text or "") for text in texts)


def message_form_errors(body: dict[str, Any]) -> dict[str, Any]:
    """The `errors` of Discord's "Invalid Form Body" answer to a message body over its limits ({} when none)."""
    errors: dict[str, Any] = {}
    if len(body.get("content") or "") > CONTENT_LIMIT:
        errors["content"] = _too_long(CONTENT_LIMIT)
    embeds = body.get("embeds") or []
    embed_errors: dict[str, Any] = {}
    for index, embed in enumerate(embeds):
        found = {key: _too_long(limit) for key, limit in EMBED_LIMITS.items() if len(embed.get(key) or "") > limit}
        for number, embed_field in enumerate(embed.get("fields") or []):
            for key, limit in EMBED_FIELD_LIMITS.items():
                if len(embed_field.get(key) or "") > limit:
                    found.setdefault("fields", {}).setdefault(str(number), {})[key] = _too_long(limit)
        if found:
            embed_errors[str(index)] = found
    if sum(_embed_size(embed) for embed in embeds) > EMBED_TOTAL_LIMIT:
        embed_errors["_errors"] = [
            {"code": "MAX_EMBED_SIZE_EXCEEDED", "message": f"Embed size exceeds maximum size of {EMBED_TOTAL_LIMIT}"}
        ]
    if embed_errors:
        errors["embeds"] = embed_errors
    return errors


@dataclass(frozen=True)
class RestCall:
    """One REST request the bot made. `path` is without the `/api/v10` prefix."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    time: float  # time.monotonic() when it arrived
    global_scope: bool = False  # made with the bot token, so it counts toward the global rate limit

    def matches(self, method: str, path: str | re.Pattern[str]) -> bool:
        if self.method != method:
            return False
        return bool(path.fullmatch(self.path)) if isinstance(path, re.Pattern) else self.path == path


@dataclass
class FakeUser:
    """A user of the fake guild; `role_ids` decide its permissions there."""

    id: int
    username: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)
    nick: str | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.username.title(),
            "avatar": None,
            "bot": self.bot,
        }

    def member_payload(self, *, permissions: int | None = None) -> dict[str, Any]:
        """A guild member without the nested user (as in MESSAGE_CREATE's `member`)."""
        member: dict[str, Any] = {
            "roles": [str(role_id) for role_id in self.role_ids],
            "nick": self.nick,
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "avatar": None,
        }
        if permissions is not None:
            member["permissions"] = str(permissions)
        return member


@dataclass(frozen=True)
class FakeFile:
    """A file a test attaches to a message; the fake's CDN serves `data` at the attachment's url."""

    filename: str
    data: bytes
    content_type: str | None = None  # None: Discord sent none
    delay_s: float = 0.0  # the CDN answers only after this long (or when the fake closes)
    status: int = 200  # the CDN's answer, such as 500 or 404 for a failing one

    def payload(self, attachment_id: int, url: str) -> dict[str, Any]:
        """Discord's attachment object for this file."""
        kind = {"content_type": self.content_type} if self.content_type else {}
        return {
            "id": str(attachment_id),
            "filename": self.filename,
            "size": len(self.data),
            "url": url,
            "proxy_url": url,
            **kind,
        }


@dataclass(frozen=True)
class FakeInteraction:
    """An interaction the test sent; its callbacks and webhook calls are found by `token`."""

    id: int
    token: str
    payload: dict[str, Any]


class FakeDiscord:
    """The fake server. `async with FakeDiscord() as discord:` starts it; `api_base_url` and `gateway_url`
    are the values for DISCORD_API_BASE_URL and DISCORD_GATEWAY_URL."""

    def __init__(self, *, global_limit: int | None = GLOBAL_LIMIT) -> None:
        self._ids = itertools.count(1)
        self.guild_id = self.snowflake()
        self.guilds: dict[int, str] = {self.guild_id: "Llama Farm"}  # every guild the bot is in, by id: its name
        self.bot_user = FakeUser(self.snowflake(), "llamacord", bot=True)
        self.application_id = self.bot_user.id
        self.moderator_role_id = self.snowflake()
        self.roles: dict[int, dict[str, Any]] = {
            self.guild_id: self._role(self.guild_id, "@everyone", EVERYONE_PERMISSIONS, 0),
            self.moderator_role_id: self._role(self.moderator_role_id, "Moderator", MODERATOR_PERMISSIONS, 1),
        }
        self.owner = FakeUser(self.snowflake(), "owner")
        self.alice = FakeUser(self.snowflake(), "alice")
        self.bob = FakeUser(self.snowflake(), "bob", nick="Bobby")
        self.moderator = FakeUser(self.snowflake(), "mod", role_ids=[self.moderator_role_id])
        self.other_bot = FakeUser(self.snowflake(), "otherbot", bot=True)
        self.general_id = self.snowflake()
        self.random_id = self.snowflake()
        self.thread_id = self.snowflake()
        self.dm_id = self.snowflake()
        self.group_dm_id = self.snowflake()  # a group DM the bot's commands could be used in if it allowed that
        self.channels: dict[int, dict[str, Any]] = {
            self.general_id: self._text_channel(self.general_id, "general", 0),
            self.random_id: self._text_channel(self.random_id, "random", 1),
            self.thread_id: self._thread(self.thread_id, "a-thread", self.general_id),
        }

        self.calls: list[RestCall] = []
        self.rejected: list[RestCall] = []  # calls answered 400 for breaking Discord's message limits
        self.global_limit = global_limit  # requests a second with the bot token; None: no limit (tests may change it)
        self.rate_limited: list[RestCall] = []  # calls answered 429 for going over the global limit
        self.gateway_events: list[dict[str, Any]] = []  # what clients sent on the gateway (IDENTIFY, ...)
        self.commands: dict[int | None, list[dict[str, Any]]] = {}  # synced commands by guild id (None: global)
        self.messages: dict[int, dict[str, Any]] = {}  # every message, by id, as it stands after edits
        self.deleted: set[int] = set()  # ids of messages deleted (by a test or the bot)
        self.reactions: list[tuple[int, str]] = []  # (message id, emoji) of every reaction the bot added
        self.created_by: dict[int, RestCall] = {}  # the POST that created each of the bot's channel messages
        self.interactions: dict[str, dict[str, Any]] = {}  # INTERACTION_CREATE payloads sent, by token
        self.interaction_messages: dict[str, dict[str, Any]] = {}  # @original response message by token
        self.ready_count = 0  # READY payloads sent (one per IDENTIFY)
        self.token = BOT_TOKEN  # the only token REST calls and IDENTIFY are accepted with
        self.recommended_shards = 1  # what GET /gateway/bot recommends
        self.advertised_gateway_url: str | None = None  # the URL GET /gateway/bot gives (None: this server's)
        self.cdn: dict[int, FakeFile] = {}  # what the CDN serves, by attachment id
        self.cdn_fetches: list[int] = []  # the attachment ids the CDN was asked for, in order
        self._cdn_closing = asyncio.Event()  # ends the late answers of a slow CDN, so closing does not wait for them

        self._sockets: dict[web.WebSocketResponse, tuple[int, int] | None] = {}  # identified ones: [id, count]
        self._sequence = 0
        self._global_window: deque[float] = deque()  # arrival times of the accepted global-scope calls, last second
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn_file)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        self._cdn_closing.set()
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def snowflake(self, *, shard: tuple[int, int] | None = None) -> int:
        """A new id shaped like Discord's: the time in the high bits, a counter in the low ones. With `shard`
        ([id, count]), a guild id on that shard: the time is moved back by under `count` milliseconds."""
        elapsed_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        if shard is not None:
            elapsed_ms -= (elapsed_ms - shard[0]) % shard[1]
        return (elapsed_ms << 22) | (next(self._ids) & 0x3FFFFF)

    @staticmethod
    def shard_of(guild_id: int | None, shard_count: int) -> int:
        """The shard that receives a guild's events; direct messages (no guild) go to shard 0."""
        return 0 if guild_id is None else (guild_id >> 22) % shard_count

    def add_guild(self, name: str, *, shard: tuple[int, int] | None = None) -> tuple[int, int]:
        """Put the bot in another guild, with one text channel and the @everyone role, on `shard` ([id, count]) if
        given. Returns (guild id, channel id). Add guilds before the bot connects: no GUILD_CREATE is sent later."""
        guild_id = self.snowflake(shard=shard)
        channel_id = self.snowflake()
        self.guilds[guild_id] = name
        self.channels[channel_id] = self._text_channel(channel_id, "general", 0, guild_id=guild_id)
        return guild_id, channel_id

    def add_channel(self, name: str, *, bot_denied: int = 0) -> int:
        """Another text channel in the first guild; returns its id. `bot_denied`: permission bits a member
        overwrite denies the bot there. Add channels before the bot connects."""
        channel_id = self.snowflake()
        channel = self.channels[channel_id] = self._text_channel(channel_id, name, len(self.channels))
        if bot_denied:
            overwrite = {"id": str(self.bot_user.id), "type": 1, "allow": "0", "deny": str(bot_denied)}
            channel["permission_overwrites"].append(overwrite)
        return channel_id

    def add_role(self, name: str, *, permissions: int = 0) -> int:
        """Another role in the first guild (give it to a `FakeUser` through `role_ids`); returns its id. Add roles
        before the bot connects."""
        role_id = self.snowflake()
        self.roles[role_id] = self._role(role_id, name, permissions, len(self.roles))
        return role_id

    def bot_denied(self, channel_id: int) -> int:
        """The permission bits the bot's member overwrite denies in a channel (0 where it has none)."""
        channel = self.channels.get(channel_id) or {}
        overwrites = channel.get("permission_overwrites") or []
        return sum(int(o["deny"]) for o in overwrites if int(o["id"]) == self.bot_user.id)

    def guild_of(self, channel_id: int) -> int | None:
        """The guild a channel belongs to (the first guild for a channel the fake does not know); None for the DM."""
        if channel_id in (self.dm_id, self.group_dm_id):
            return None
        channel = self.channels.get(channel_id)
        return int(channel["guild_id"]) if channel is not None else self.guild_id

    # --- waiting -----------------------------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(
        self, predicate: Callable[[], Any], *, timeout_s: float = DEFAULT_TIMEOUT, what: str = "condition"
    ) -> Any:
        """Wait until `predicate()` is truthy (re-checked after every REST call and gateway message)."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                result = predicate()
                while not result:
                    await self._changed.wait()
                    result = predicate()
                return result
        except TimeoutError:
            recent = "\n".join(f"  {c.method} {c.path} {c.query or ''} {c.json!r:.300}" for c in self.calls[-15:])
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what}; last REST calls:\n{recent}"
            ) from None

    async def wait_for_call(
        self,
        method: str,
        path: str | re.Pattern[str],
        *,
        where: Callable[[RestCall], bool] = lambda call: True,
        after: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT,
    ) -> RestCall:
        """The first call at index >= `after` with this method and path (a string, or a pattern to fullmatch)."""

        def find() -> RestCall | None:
            return next((c for c in self.calls[after:] if c.matches(method, path) and where(c)), None)

        return await self.wait_until(find, timeout_s=timeout_s, what=f"{method} {getattr(path, 'pattern', path)}")

    def find_calls(self, method: str, path: str | re.Pattern[str], *, after: int = 0) -> list[RestCall]:
        return [c for c in self.calls[after:] if c.matches(method, path)]

    async def wait_for_ready(self, count: int = 1, *, timeout_s: float = DEFAULT_TIMEOUT) -> None:
        """Wait until `count` READY payloads have been sent (a restarted bot identifies again)."""
        await self.wait_until(lambda: self.ready_count >= count, timeout_s=timeout_s, what=f"READY #{count}")

    # --- what the bot posted -----------------------------------------------------------------------------------

    def bot_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """The bot's messages in a channel, oldest first, as they stand now."""
        return [
            m
            for m in self.messages.values()
            if int(m["channel_id"]) == channel_id and int(m["author"]["id"]) == self.bot_user.id
        ]

    def replies_to(self, message_id: int) -> list[dict[str, Any]]:
        """The bot's messages that reply to `message_id`."""
        return [
            m
            for m in self.messages.values()
            if int(m["author"]["id"]) == self.bot_user.id
            and int((m.get("message_reference") or {}).get("message_id", 0)) == message_id
        ]

    def command(self, name: str, guild_id: int | None = None) -> dict[str, Any]:
        """The command as the bot synced it: to `guild_id` if it synced it there, else globally (as Discord
        resolves a slash command in a guild)."""
        for scope in (guild_id, None) if guild_id is not None else (None,):
            for command in self.commands.get(scope, []):
                if command["name"] == name:
                    return command
        raise KeyError(f"the bot never synced a /{name} command")

    # --- driving the bot (gateway events) ----------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH event to every identified gateway connection that should see it: an unsharded one sees
        everything, a shard only the events of its guilds (and direct messages on shard 0)."""
        self._sequence += 1
        frame = json.dumps({"op": OP_DISPATCH, "t": event, "s": self._sequence, "d": data})
        guild_id = int(data["guild_id"]) if data.get("guild_id") else None
        for socket, shard in list(self._sockets.items()):
            if not socket.closed and (shard is None or self.shard_of(guild_id, shard[1]) == shard[0]):
                await socket.send_str(frame)

    async def send_message(
        self,
        author: FakeUser,
        content: str,
        *,
        channel_id: int | None = None,
        mention_bot: bool = False,
        mentions: list[FakeUser] | None = None,
        reply_to: int | None = None,
        message_type: int | None = None,
        webhook: bool = False,
        attachments: Sequence[FakeFile] = (),
    ) -> dict[str, Any]:
        """A user posts a message: MESSAGE_CREATE goes to the bot. `channel_id=self.dm_id` posts in the DM.

        `mention_bot` puts the bot's mention in front; `mentions` lists users whose `<@id>` the content holds;
        `attachments` are uploaded with it, to be fetched from the CDN."""
        channel_id = self.general_id if channel_id is None else channel_id
        mentions = list(mentions or [])
        if mention_bot:
            content = f"<@{self.bot_user.id}> {content}"
            mentions.append(self.bot_user)
        message = self._message(channel_id, author, content, mentions=mentions, reply_to=reply_to)
        if message_type is not None:
            message["type"] = message_type
        if webhook:
            message["webhook_id"] = str(self.snowflake())
            message.pop("member", None)
        message["attachments"] = [self._upload(channel_id, file) for file in attachments]
        self.messages[int(message["id"])] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    # --- the CDN -----------------------------------------------------------------------------------------------

    def _upload(self, channel_id: int, file: FakeFile) -> dict[str, Any]:
        """Keep `file` on the CDN; its attachment object, with a signed-looking URL as Discord's are."""
        attachment_id = self.snowflake()
        self.cdn[attachment_id] = file
        path = f"/attachments/{channel_id}/{attachment_id}/{urllib.parse.quote(file.filename)}"
        url = f"http://127.0.0.1:{self.port}{path}?ex=0&is=0&hm=0"
        return file.payload(attachment_id, url)

    async def _cdn_file(self, request: web.Request) -> web.Response:
        attachment_id = int(request.match_info["attachment_id"])
        self.cdn_fetches.append(attachment_id)
        await self._notify()
        file = self.cdn.get(attachment_id)
        if file is None:
            return web.Response(status=404, text="Not Found")
        if file.delay_s:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._cdn_closing.wait(), file.delay_s)
        if file.status != 200:
            return web.Response(status=file.status, text="CDN error")
        content_type = file.content_type or "application/octet-stream"
        return web.Response(body=file.data, headers={"Content-Type": content_type})

    async def edit_message(self, message_id: int, content: str) -> None:
        """Its author edits a message: MESSAGE_UPDATE (the whole message, as Discord sends it) goes to the bot."""
        message = self.messages[message_id]
        message["content"], message["edited_timestamp"] = content, _now_iso()
        await self.dispatch("MESSAGE_UPDATE", message)

    async def delete_message(self, message_id: int) -> None:
        """Someone deletes a message: MESSAGE_DELETE goes to the bot (ids only, as Discord sends it)."""
        message = self.messages.pop(message_id)
        self.deleted.add(message_id)
        await self.dispatch("MESSAGE_DELETE", self._deletion(int(message["channel_id"]), id=str(message_id)))

    async def bulk_delete(self, channel_id: int, message_ids: list[int]) -> None:
        """A moderator (or a bot) deletes several messages of one channel at once: one MESSAGE_DELETE_BULK."""
        for message_id in message_ids:
            self.messages.pop(message_id, None)
            self.deleted.add(message_id)
        ids = [str(message_id) for message_id in message_ids]
        await self.dispatch("MESSAGE_DELETE_BULK", self._deletion(channel_id, ids=ids))

    def _deletion(self, channel_id: int, **ids: Any) -> dict[str, Any]:
        guild_id = self.guild_of(channel_id)
        return {**ids, "channel_id": str(channel_id), **({"guild_id": str(guild_id)} if guild_id else {})}

    async def slash(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: FakeUser,
        channel_id: int | None = None,
        permissions: int | None = None,
        app_permissions: int = ALL_PERMISSIONS,
    ) -> FakeInteraction:
        """A user runs a synced slash command. Option types come from the synced command, as Discord's would."""
        channel_id = self.general_id if channel_id is None else channel_id
        guild_id = self.guild_of(channel_id)
        command = self.command(name, guild_id)
        option_types = {option["name"]: option["type"] for option in command.get("options", [])}
        data: dict[str, Any] = {
            "id": command["id"],
            "name": name,
            "type": 1,
            "options": [
                # Discord sends the id of a user, channel or role as a string.
                {"name": k, "type": option_types[k], "value": str(v) if option_types[k] in SNOWFLAKE_OPTIONS else v}
                for k, v in (options or {}).items()
            ],
        }
        roles = [int(v) for k, v in (options or {}).items() if option_types[k] == OPTION_ROLE]
        if roles:  # Discord sends the objects an option names alongside
            data["resolved"] = {"roles": {str(role_id): self.roles[role_id] for role_id in roles}}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        return await self._interact(INTERACTION_COMMAND, data, user, channel_id, permissions, app_permissions)

    async def press_button(
        self,
        message_id: int,
        custom_id: str,
        *,
        user: FakeUser,
        permissions: int | None = None,
    ) -> FakeInteraction:
        """A user presses a button on one of the bot's messages."""
        message = self.messages[message_id]
        data = {"custom_id": custom_id, "component_type": 2}
        channel_id = int(message["channel_id"])
        return await self._interact(
            INTERACTION_COMPONENT, data, user, channel_id, permissions, ALL_PERMISSIONS, message=message
        )

    def interaction_calls(self, interaction: FakeInteraction) -> list[RestCall]:
        """The callback and webhook calls the bot made for one interaction."""
        return [c for c in self.calls if interaction.token in c.path]

    async def wait_for_response(
        self, interaction: FakeInteraction, *, timeout_s: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """The bot's answer to an interaction, as Discord accepted it: the callback's data for an immediate reply,
        or after a deferral the deferred message once an @original edit or the first follow-up filled it in."""

        def answer() -> dict[str, Any] | None:
            for call in self.interaction_calls(interaction):
                body = call.json or {}
                if any(call is rejected for rejected in self.rejected) or not call.path.endswith("/callback"):
                    continue
                if body.get("type") in (CALLBACK_MESSAGE, CALLBACK_UPDATE):
                    return body.get("data") or {}
                if body.get("type") == CALLBACK_DEFERRED_MESSAGE:
                    message = self.interaction_messages[interaction.token]
                    return None if int(message["flags"]) & LOADING_FLAG else message
            return None

        return await self.wait_until(answer, timeout_s=timeout_s, what=f"an answer to interaction {interaction.id}")

    def permissions_of(self, user: FakeUser) -> int:
        """A member's guild-wide permissions from its roles (the guild owner and administrators have all)."""
        if user.id == self.owner.id:
            return ALL_PERMISSIONS
        bits = int(self.roles[self.guild_id]["permissions"])
        for role_id in user.role_ids:
            bits |= int(self.roles[role_id]["permissions"])
        return ALL_PERMISSIONS if bits & ADMINISTRATOR else bits

    # --- payloads ----------------------------------------------------------------------------------------------

    @staticmethod
    def _role(role_id: int, name: str, permissions: int, position: int) -> dict[str, Any]:
        return {
            "id": str(role_id),
            "name": name,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "color": 0,
            "hoist": False,
            "position": position,
            "permissions": str(permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def _text_channel(
        self, channel_id: int, name: str, position: int, *, guild_id: int | None = None
    ) -> dict[str, Any]:
        return {
            "id": str(channel_id),
            "type": CHANNEL_TEXT,
            "guild_id": str(guild_id or self.guild_id),
            "name": name,
            "position": position,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }

    def _thread(self, thread_id: int, name: str, parent_id: int) -> dict[str, Any]:
        return {
            "id": str(thread_id),
            "type": CHANNEL_PUBLIC_THREAD,
            "guild_id": str(self.guild_id),
            "parent_id": str(parent_id),
            "owner_id": str(self.alice.id),
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": "2024-01-01T00:00:00+00:00",
                "locked": False,
            },
        }

    def _channel_payload(self, channel_id: int, user: FakeUser) -> dict[str, Any]:
        if channel_id == self.dm_id:
            return {"id": str(channel_id), "type": CHANNEL_DM, "recipients": [user.payload()], "last_message_id": None}
        if channel_id == self.group_dm_id:
            recipients = [user.payload(), self.bob.payload()]
            return {"id": str(channel_id), "type": CHANNEL_GROUP_DM, "recipients": recipients, "name": "friends"}
        return self.channels[channel_id]

    def _guild_create(self, guild_id: int) -> dict[str, Any]:
        in_guild = [c for c in self.channels.values() if int(c["guild_id"]) == guild_id]
        channels = [c for c in in_guild if c["type"] != CHANNEL_PUBLIC_THREAD]
        threads = [c for c in in_guild if c["type"] == CHANNEL_PUBLIC_THREAD]
        bot_member = {**self.bot_user.member_payload(), "user": self.bot_user.payload()}
        if guild_id == self.guild_id:
            roles = list(self.roles.values())
        else:
            roles = [self._role(guild_id, "@everyone", EVERYONE_PERMISSIONS, 0)]
        return {
            "id": str(guild_id),
            "name": self.guilds[guild_id],
            "icon": None,
            "owner_id": str(self.owner.id),
            "unavailable": False,
            "member_count": 6,
            "large": False,
            "features": [],
            "roles": roles,
            "emojis": [],
            "stickers": [],
            "channels": channels,
            "threads": threads,
            "members": [bot_member],
            "voice_states": [],
            "presences": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "preferred_locale": "en-US",
            "premium_tier": 0,
            "system_channel_flags": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
        }

    def _application(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": "llamacord",
            "icon": None,
            "description": "",
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner.payload(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot_user.payload(),
        }

    def _message(
        self,
        channel_id: int,
        author: FakeUser,
        content: str,
        *,
        mentions: list[FakeUser] | None = None,
        reply_to: int | None = None,
    ) -> dict[str, Any]:
        guild_id = self.guild_of(channel_id)
        in_guild = guild_id is not None
        message: dict[str, Any] = {
            "id": str(self.snowflake()),
            "channel_id": str(channel_id),
            "author": author.payload(),
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [
                {**user.payload(), **({"member": user.member_payload()} if in_guild else {})} for user in mentions or []
            ],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "components": [],
            "pinned": False,
            "type": MESSAGE_DEFAULT,
            "flags": 0,
        }
        if in_guild:
            message["guild_id"] = str(guild_id)
            message["member"] = author.member_payload()
        if reply_to is not None:
            message["type"] = MESSAGE_REPLY
            message["message_reference"] = {
                "type": 0,
                "message_id": str(reply_to),
                "channel_id": str(channel_id),
                **({"guild_id": str(guild_id)} if in_guild else {}),
            }
            message["referenced_message"] = self.messages.get(reply_to)
        return message

    def _apply_message_body(self, message: dict[str, Any], body: dict[str, Any]) -> None:
        """What a create/edit body changes on a stored message."""
        for key in ("content", "embeds", "components", "flags", "allowed_mentions"):
            if key in body and body[key] is not None:
                message[key] = body[key]
        if "components" in body and body["components"] is None:
            message["components"] = []

    def _bot_message(self, channel_id: int, body: dict[str, Any]) -> dict[str, Any]:
        message = self._message(channel_id, self.bot_user, "")
        self._apply_message_body(message, body)
        reference = body.get("message_reference")
        if reference:
            target = self.messages.get(int(reference["message_id"]))
            message["type"] = MESSAGE_REPLY
            message["message_reference"] = {**reference, "channel_id": str(channel_id)}
            message["referenced_message"] = target
        self.messages[int(message["id"])] = message
        return message

    async def _interact(
        self,
        kind: int,
        data: dict[str, Any],
        user: FakeUser,
        channel_id: int,
        permissions: int | None,
        app_permissions: int,
        *,
        message: dict[str, Any] | None = None,
    ) -> FakeInteraction:
        interaction_id = self.snowflake()
        token = f"token-{interaction_id}"
        guild_id = self.guild_of(channel_id)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "channel_id": str(channel_id),
            "channel": self._channel_payload(channel_id, user),
            "app_permissions": str(app_permissions),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild_id is not None:
            granted = self.permissions_of(user) if permissions is None else permissions
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = "en-US"
            payload["member"] = {**user.member_payload(permissions=granted), "user": user.payload()}
            payload["authorizing_integration_owners"] = {"0": str(guild_id)}
            payload["context"] = CONTEXT_GUILD
        else:
            payload["user"] = user.payload()
            payload["authorizing_integration_owners"] = {"1": str(user.id)}
            payload["context"] = CONTEXT_BOT_DM if channel_id == self.dm_id else CONTEXT_PRIVATE_CHANNEL
        if message is not None:
            payload["message"] = message
        self.interactions[token] = payload
        await self.dispatch("INTERACTION_CREATE", payload)
        return FakeInteraction(interaction_id, token, payload)

    # --- gateway -----------------------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(json.dumps({"op": OP_HELLO, "d": {"heartbeat_interval": 41_250}}))
        try:
            async for frame in socket:
                if frame.type is not WSMsgType.TEXT:
                    break
                event = json.loads(frame.data)
                self.gateway_events.append(event)
                if event["op"] == OP_HEARTBEAT:
                    await socket.send_str(json.dumps({"op": OP_HEARTBEAT_ACK}))
                elif event["op"] == OP_IDENTIFY and event["d"].get("token") != self.token:
                    await socket.close(code=4004, message=b"Authentication failed.")
                elif event["op"] == OP_IDENTIFY:
                    shard = event["d"].get("shard")
                    await self._identify(socket, tuple(shard) if shard is not None else None)
                elif event["op"] == OP_RESUME:
                    # No session survives here: tell the client to identify anew.
                    await socket.send_str(json.dumps({"op": 9, "d": False}))
                await self._notify()
        finally:
            self._sockets.pop(socket, None)
        return socket

    async def _identify(self, socket: web.WebSocketResponse, shard: tuple[int, int] | None) -> None:
        self._sockets[socket] = shard
        guild_ids = [g for g in self.guilds if shard is None or self.shard_of(g, shard[1]) == shard[0]]
        ready = {
            "v": 10,
            "user": self.bot_user.payload(),
            "guilds": [{"id": str(guild_id), "unavailable": True} for guild_id in guild_ids],
            "session_id": f"session-{self.snowflake()}",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            **({"shard": list(shard)} if shard is not None else {}),
        }
        self._sequence += 1
        await socket.send_str(json.dumps({"op": OP_DISPATCH, "t": "READY", "s": self._sequence, "d": ready}))
        for guild_id in guild_ids:
            self._sequence += 1
            frame = {"op": OP_DISPATCH, "t": "GUILD_CREATE", "s": self._sequence, "d": self._guild_create(guild_id)}
            await socket.send_str(json.dumps(frame))
        self.ready_count += 1

    # --- REST --------------------------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        body: Any = None
        if request.can_read_body:
            text = await request.text()
            body = json.loads(text) if text and request.content_type == "application/json" else text or None
        # Interaction callbacks and webhooks authenticate with their token in the path, everything else with the
        # bot token, which is what the global rate limit counts (interaction endpoints are exempt from it).
        bot_token = request.headers.get("Authorization") == f"Bot {self.token}"
        global_scope = bot_token and not path.startswith("/interactions/")
        call = RestCall(request.method, path, dict(request.query), body, time.monotonic(), global_scope)
        self.calls.append(call)
        try:
            if not path.startswith(("/interactions/", "/webhooks/")) and not bot_token:
                return json_response({"message": "401: Unauthorized", "code": 0}, status=401)
            if global_scope and (retry_after := self._over_global_limit(call.time)) is not None:
                self.rate_limited.append(call)
                return self._rate_limited_response(retry_after)
            if errors := self._form_errors(call):
                self.rejected.append(call)
                payload = {"message": "Invalid Form Body", "code": INVALID_FORM_BODY, "errors": errors}
                return json_response(payload, status=400)
            return await self._answer(call)
        finally:
            await self._notify()

    async def _answer(self, call: RestCall) -> web.StreamResponse:
        method, path, body = call.method, call.path, call.json
        app = str(self.application_id)
        if path == "/gateway":
            return json_response({"url": self.gateway_url})
        if path == "/gateway/bot":
            limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
            url = self.advertised_gateway_url or self.gateway_url
            return json_response({"url": url, "shards": self.recommended_shards, "session_start_limit": limit})
        if method == "GET" and path == "/users/@me":
            return json_response(self.bot_user.payload())
        if method == "GET" and path in ("/oauth2/applications/@me", "/applications/@me"):
            return json_response(self._application())
        if match := re.fullmatch(rf"/applications/{app}(?:/guilds/(\d+))?/commands", path):
            guild_id = int(match[1]) if match[1] else None
            if method == "PUT":
                self.commands[guild_id] = [self._registered(command, guild_id) for command in body]
            if method in ("PUT", "GET"):
                return json_response(self.commands.get(guild_id, []))
        if match := re.fullmatch(r"/channels/(\d+)", path):
            channel_id = int(match[1])
            if method == "GET" and channel_id in self.channels:
                return json_response(self.channels[channel_id])
        if re.fullmatch(r"/channels/(\d+)/typing", path):
            return web.Response(status=204)
        sending = re.fullmatch(r"/channels/(\d+)/messages(?:/\d+)?", path)
        if sending and method in ("POST", "PATCH") and self.bot_denied(int(sending[1])) & SEND_MESSAGES:
            return json_response({"message": "Missing Permissions", "code": MISSING_PERMISSIONS}, status=403)
        if (match := re.fullmatch(r"/channels/(\d+)/messages/(\d+)/reactions/([^/]+)/@me", path)) and method == "PUT":
            if int(match[2]) not in self.messages:
                return json_response({"message": "Unknown Message", "code": UNKNOWN_MESSAGE}, status=404)
            self.reactions.append((int(match[2]), urllib.parse.unquote(match[3])))
            return web.Response(status=204)
        if (match := re.fullmatch(r"/channels/(\d+)/messages", path)) and method == "POST":
            message = self._bot_message(int(match[1]), body)
            self.created_by[int(message["id"])] = call
            await self.dispatch("MESSAGE_CREATE", message)
            return json_response(message)
        if match := re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path):
            message = self.messages.get(int(match[2]))
            if message is not None and method == "GET":
                return json_response(message)
            if message is not None and method == "PATCH":
                self._apply_message_body(message, body)
                message["edited_timestamp"] = _now_iso()
                await self.dispatch("MESSAGE_UPDATE", message)  # as Discord does, the bot hears its own edits
                return json_response(message)
            if message is not None and method == "DELETE":
                await self.delete_message(int(match[2]))
                return web.Response(status=204)
            if message is None:
                return json_response({"message": "Unknown Message", "code": UNKNOWN_MESSAGE}, status=404)
        if match := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path):
            return self._callback(int(match[1]), match[2], body, call.query)
        if match := re.fullmatch(rf"/webhooks/{app}/([^/]+)(?:/messages/(@original|\d+))?", path):
            return self._webhook(method, match[1], match[2], body)
        return json_response({"message": f"404: Not Found ({method} {path})", "code": 0}, status=404)

    def _over_global_limit(self, now: float) -> float | None:
        """Seconds until a request may go, when one arriving `now` would be over the global limit; else None, and
        it counts. Only accepted requests fill the window, so a client that waits out `retry_after` gets through."""
        window = self._global_window
        while window and window[0] <= now - GLOBAL_WINDOW_S:
            window.popleft()
        if self.global_limit is not None and len(window) >= self.global_limit:
            return window[0] + GLOBAL_WINDOW_S - now
        window.append(now)
        return None

    @staticmethod
    def _rate_limited_response(retry_after: float) -> web.Response:
        """Discord's answer to a request over the global limit."""
        payload = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": True}
        response = json_response(payload, status=429)
        response.headers.update(
            {
                "X-RateLimit-Global": "true",
                "X-RateLimit-Scope": "global",
                "Retry-After": str(math.ceil(retry_after)),
                "Via": "1.1 google",
            }
        )
        return response

    def peak_rate(self, *, after: int = 0) -> int:
        """The most global-scope requests (429s included) that arrived in any one second, among calls[after:]."""
        times = [call.time for call in self.calls[after:] if call.global_scope]
        peak, start = 0, 0
        for end, arrived in enumerate(times):
            while times[start] <= arrived - GLOBAL_WINDOW_S:
                start += 1
            peak = max(peak, end - start + 1)
        return peak

    @staticmethod
    def _form_errors(call: RestCall) -> dict[str, Any]:
        """What Discord would refuse in a call that creates or edits a message ({} when it is within the limits)."""
        body = call.json if isinstance(call.json, dict) else {}
        if call.method not in ("POST", "PATCH"):
            return {}
        if re.fullmatch(r"/channels/\d+/messages(?:/\d+)?", call.path) or call.path.startswith("/webhooks/"):
            return message_form_errors(body)
        if call.path.endswith("/callback") and body.get("type") in (CALLBACK_MESSAGE, CALLBACK_UPDATE):
            errors = message_form_errors(body.get("data") or {})
            return {"data": errors} if errors else {}
        return {}

    def _registered(self, command: dict[str, Any], guild_id: int | None) -> dict[str, Any]:
        permissions = command.get("default_member_permissions")
        return {
            **command,
            # Discord answers with the permission bits as a string, whatever type they were sent as.
            "default_member_permissions": None if permissions is None else str(permissions),
            "id": str(self.snowflake()),
            "application_id": str(self.application_id),
            "version": str(self.snowflake()),
            **({"guild_id": str(guild_id)} if guild_id is not None else {}),
        }

    def _callback(self, interaction_id: int, token: str, body: dict[str, Any], query: dict[str, str]) -> web.Response:
        kind = body.get("type")
        data = body.get("data") or {}
        sent = self.interactions[token]
        interaction = {"id": str(interaction_id), "type": sent["type"]}
        resource: dict[str, Any] | None = None
        if kind in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            message = self._message(int(sent["channel_id"]), self.bot_user, "")
            self._apply_message_body(message, data)
            user = (sent.get("member") or sent)["user"]
            message["interaction_metadata"] = {"id": str(interaction_id), "type": sent["type"], "user": user}
            if kind == CALLBACK_DEFERRED_MESSAGE:
                message["flags"] = int(data.get("flags", 0)) | LOADING_FLAG
            self.interaction_messages[token] = message
            interaction |= {
                "response_message_id": message["id"],
                "response_message_loading": kind == CALLBACK_DEFERRED_MESSAGE,
                "response_message_ephemeral": bool(int(message.get("flags", 0)) & EPHEMERAL_FLAG),
            }
            resource = {"type": kind, "message": message}
        elif kind == CALLBACK_UPDATE:
            message = sent.get("message")
            if message is not None:
                message = self.messages[int(message["id"])]
                self._apply_message_body(message, data)
                resource = {"type": kind, "message": message}
        if query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response({"interaction": interaction, **({"resource": resource} if resource else {})})

    def _webhook(self, method: str, token: str, which: str | None, body: dict[str, Any] | None) -> web.Response:
        original = self.interaction_messages.get(token)
        if which is None and method == "POST" and original is not None and int(original["flags"]) & LOADING_FLAG:
            # The first follow-up after a deferral fills in the loading message, as visible as the deferral was:
            # Discord ignores the follow-up's own flags (an ephemeral error after a public defer shows publicly).
            self._apply_message_body(original, {**(body or {}), "flags": None})
            original["flags"] = int(original["flags"]) & ~LOADING_FLAG
            return json_response(original)
        if which is None and method == "POST":  # follow-up message
            message = self._message(int(self.interactions[token]["channel_id"]), self.bot_user, "")
            self._apply_message_body(message, body or {})
            self.messages[int(message["id"])] = message
            return json_response(message)
        if which == "@original":
            if original is None:
                return json_response({"message": "Unknown interaction", "code": 10062}, status=404)
            if method == "PATCH":
                self._apply_message_body(original, body or {})
                original["flags"] = int(original.get("flags", 0)) & ~LOADING_FLAG
            return json_response(original)
        message = self.messages.get(int(which)) if which else None
        if message is None:
            return json_response({"message": "Unknown Message", "code": 10008}, status=404)
        if method == "PATCH":
            self._apply_message_body(message, body or {})
        return json_response(message)


@asynccontextmanager
async def running(client: discord.Client, *, timeout_s: float = DEFAULT_TIMEOUT) -> AsyncIterator[discord.Client]:
    """Start a discord.py client (already pointed at a fake), wait for on_ready, and close it at the end.

    discord.py logs gateway errors and retries instead of raising, so a start that goes wrong shows up here as
    a timeout rather than a hang.
    """
    async with client:
        task = asyncio.create_task(client.start(BOT_TOKEN))
        ready = asyncio.create_task(client.wait_until_ready())
        done, _ = await asyncio.wait({task, ready}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            await client.close()
            if task.done():
                task.result()  # raises what stopped the client
            task.cancel()
            raise AssertionError(f"the client was not ready within {timeout_s}s")
        try:
            yield client
        finally:
            await client.close()
            await asyncio.wait_for(task, timeout_s)
