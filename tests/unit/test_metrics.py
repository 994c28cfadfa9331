"""Metrics: what a reply and an error record, engine gauges read at scrape time, and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bot.engine.api import EngineStats, FinishReason, RequestMetrics
from bot.metrics import HEALTH_PATH, METRICS_PATH, ErrorKind, Metrics, MetricsServer, ReplyOutcome
from bot.settings import Settings

TIMEOUT = aiohttp.ClientTimeout(total=5)


REQUEST = RequestMetrics(
    queue_wait_s=0.02,
    ttft_s=0.3,
    prompt_tokens=100,
    cached_prompt_tokens=64,
    generated_tokens=20,
    total_s=1.5,
    finish_reason=FinishReason.STOP,
)


def request(**changes: object) -> RequestMetrics:
    return dataclasses.replace(REQUEST, **changes)  # type: ignore[arg-type]


def stats(**values: int) -> EngineStats:
    return EngineStats(**({"waiting": 0, "running": 0, "max_batch_size": 32, "max_queued_requests": 64} | values))


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_completed_reply_moves_tokens_and_latency() -> None:
    metrics = Metrics()
    metrics.observe_reply(ReplyOutcome.COMPLETED, request())
    metrics.observe_reply(
        "completed", request(prompt_tokens=50, cached_prompt_tokens=0, generated_tokens=5, ttft_s=0.1, total_s=0.4)
    )

    assert sample(metrics, "llamacord_replies_total", outcome="completed") == 2
    assert sample(metrics, "llamacord_prompt_tokens_total") == 150
    assert sample(metrics, "llamacord_prompt_tokens_cached_total") == 64
    assert sample(metrics, "llamacord_prompt_tokens_computed_total") == 36 + 50
    assert sample(metrics, "llamacord_generated_tokens_total") == 25
    assert sample(metrics, "llamacord_time_to_first_token_seconds_count") == 2
    assert sample(metrics, "llamacord_time_to_first_token_seconds_sum") == pytest.approx(0.4)
    assert sample(metrics, "llamacord_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert sample(metrics, "llamacord_reply_duration_seconds_count") == 2
    assert sample(metrics, "llamacord_reply_duration_seconds_sum") == pytest.approx(1.9)
    assert sample(metrics, "llamacord_queue_wait_seconds_count") == 2


def test_cancelled_reply_counts_tokens_but_not_latency() -> None:
    metrics = Metrics()
    metrics.observe_reply(ReplyOutcome.CANCELLED, request(ttft_s=None, generated_tokens=0, total_s=0.05))

    assert sample(metrics, "llamacord_replies_total", outcome="cancelled") == 1
    assert sample(metrics, "llamacord_replies_total", outcome="completed") == 0
    assert sample(metrics, "llamacord_prompt_tokens_total") == 100
    assert sample(metrics, "llamacord_time_to_first_token_seconds_count") == 0
    assert sample(metrics, "llamacord_reply_duration_seconds_count") == 0


def test_busy_reply_and_errors_by_kind() -> None:
    metrics = Metrics()
    metrics.observe_reply(ReplyOutcome.BUSY)
    metrics.count_error(ErrorKind.BUSY)
    metrics.count_error("discord")
    metrics.count_error(ErrorKind.DISCORD)

    assert sample(metrics, "llamacord_replies_total", outcome="busy") == 1
    assert sample(metrics, "llamacord_prompt_tokens_total") == 0
    assert sample(metrics, "llamacord_errors_total", kind="busy") == 1
    assert sample(metrics, "llamacord_errors_total", kind="discord") == 2
    assert sample(metrics, "llamacord_errors_total", kind="generation") == 0


def test_every_label_value_is_exported_before_it_happens() -> None:
    metrics = Metrics()
    for outcome in ("completed", "cancelled", "busy", "failed"):
        assert sample(metrics, "llamacord_replies_total", outcome=outcome) == 0
    for kind in ("busy", "generation", "discord", "internal"):
        assert sample(metrics, "llamacord_errors_total", kind=kind) == 0


def test_unknown_labels_are_refused_to_bound_cardinality() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.count_error("KeyError: 'x'")
    with pytest.raises(ValueError):
        metrics.observe_reply("stop")


def test_registries_are_private() -> None:
    first, second = Metrics(), Metrics()  # a shared registry would raise "Duplicated timeseries"
    first.count_error(ErrorKind.INTERNAL)

    assert sample(second, "llamacord_errors_total", kind="internal") == 0
    assert REGISTRY.get_sample_value("llamacord_errors_total", {"kind": "internal"}) is None


def test_engine_gauges_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    assert sample(metrics, "llamacord_requests_waiting") is None  # no engine yet: no gauge rather than a false 0

    current = stats(waiting=3, running=2)
    metrics.watch_engine(lambda: current)
    assert sample(metrics, "llamacord_requests_waiting") == 3
    assert sample(metrics, "llamacord_requests_running") == 2
    assert sample(metrics, "llamacord_max_batch_size") == 32
    assert sample(metrics, "llamacord_max_queued_requests") == 64

    current = stats(waiting=0, running=7)
    assert sample(metrics, "llamacord_requests_waiting") == 0
    assert sample(metrics, "llamacord_requests_running") == 7


def test_a_failing_engine_does_not_fail_the_scrape() -> None:
    metrics = Metrics()

    def broken() -> EngineStats:
        raise RuntimeError("engine shut down")

    metrics.watch_engine(broken)
    metrics.count_error(ErrorKind.GENERATION)
    body, _ = metrics.render()

    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert "llamacord_errors" in names
    assert "llamacord_requests_waiting" not in names


def test_metrics_host_defaults_to_loopback() -> None:
    assert Settings(_env_file=None).metrics_host == "127.0.0.1"


def health_server(
    metrics: Metrics, gateway: Callable[[], bool] = lambda: True, engine: Callable[[], bool] = lambda: True
) -> MetricsServer:
    return MetricsServer(metrics, host="127.0.0.1", port=0, gateway_connected=gateway, engine_alive=engine)


async def get(server: MetricsServer, path: str, **headers: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(f"http://127.0.0.1:{server.port}{path}", headers=headers) as response,
    ):
        return response.status, response.headers["Content-Type"], await response.text()


async def get_json(server: MetricsServer, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(f"http://127.0.0.1:{server.port}{path}") as response,
    ):
        return response.status, await response.json()


async def test_scrape_shows_counters_moving_and_engine_gauges() -> None:
    metrics = Metrics()
    current = stats(waiting=4, running=1)
    metrics.watch_engine(lambda: current)
    async with asyncio.timeout(10), health_server(metrics) as server:
        status, content_type, before = await get(server, METRICS_PATH)
        metrics.observe_reply(ReplyOutcome.COMPLETED, request(generated_tokens=42))
        current = stats(waiting=0, running=1)
        _, _, after = await get(server, METRICS_PATH)

    assert status == 200
    assert content_type.startswith("text/plain")
    values_before = parse(before)
    values_after = parse(after)
    assert values_before[("llamacord_generated_tokens_total", ())] == 0
    assert values_after[("llamacord_generated_tokens_total", ())] == 42
    assert values_after[("llamacord_replies_total", (("outcome", "completed"),))] == 1
    assert values_before[("llamacord_requests_waiting", ())] == 4
    assert values_after[("llamacord_requests_waiting", ())] == 0
    assert values_after[("llamacord_time_to_first_token_seconds_count", ())] == 1


async def test_scrape_negotiates_openmetrics() -> None:
    async with asyncio.timeout(10), health_server(Metrics()) as server:
        status, content_type, body = await get(server, METRICS_PATH, Accept="application/openmetrics-text")

    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


@pytest.mark.parametrize(
    ("gateway", "engine", "status"),
    [(True, True, 200), (False, True, 503), (True, False, 503), (False, False, 503)],
)
async def test_health_reports_gateway_and_engine(gateway: bool, engine: bool, status: int) -> None:
    async with asyncio.timeout(10), health_server(Metrics(), lambda: gateway, lambda: engine) as server:
        got_status, body = await get_json(server, HEALTH_PATH)

    assert got_status == status
    assert body["gateway_connected"] is gateway
    assert body["engine_alive"] is engine
    assert body["status"] == ("ok" if status == 200 else "unavailable")


async def test_health_follows_state_changes_and_survives_a_raising_check() -> None:
    state = {"engine": False}

    def engine_alive() -> bool:
        if state["engine"] is None:
            raise RuntimeError("engine gone")
        return bool(state["engine"])

    async with asyncio.timeout(10), health_server(Metrics(), engine=engine_alive) as server:
        loading, _ = await get_json(server, HEALTH_PATH)
        state["engine"] = True
        ready, _ = await get_json(server, HEALTH_PATH)
        state["engine"] = None
        broken, body = await get_json(server, HEALTH_PATH)

    assert (loading, ready, broken) == (503, 200, 503)
    assert body["engine_alive"] is False


async def test_other_paths_are_not_found() -> None:
    async with asyncio.timeout(10), health_server(Metrics()) as server:
        status, _, _ = await get(server, "/")

    assert status == 404


async def test_server_binds_the_given_loopback_address_and_frees_the_port() -> None:
    async with asyncio.timeout(10):
        server = health_server(Metrics())
        await server.start()
        port = server.port
        try:
            with pytest.raises(OSError):
                await MetricsServer(
                    Metrics(), host="127.0.0.1", port=port, gateway_connected=bool, engine_alive=bool
                ).start()
        finally:
            await server.close()
        async with MetricsServer(
            Metrics(), host="127.0.0.1", port=port, gateway_connected=lambda: True, engine_alive=lambda: True
        ) as again:
            status, _ = await get_json(again, HEALTH_PATH)

    assert status == 200


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
