"""SyncPublisher (threaded / WSGI gateways) on the real embedded broker.

Same record contract and fail-fast semantics as the async publisher: checked by reading
the raw records back, by a broker that is not there, by a record the broker refuses and
by a broker that dies mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from processor.clients import (
    BrokerUnavailable,
    DeliveryError,
    PublishError,
    SyncPublisher,
    tee_chunks_sync,
)
from processor.core import assemble_many, parse_chunk
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks, fake_upstream_app, running_server
from tests.integration.test_clients_publish import _by_key, _oversize, _read_all, _settings

pytestmark = pytest.mark.integration


def _publish_from_threads(publisher: SyncPublisher, streams: dict[str, list[Any]]) -> None:
    def gateway_thread(ids: list[str]) -> None:
        for cid in ids:
            with publisher.stream(tenant="sync", provider="openai", request_started_at=1) as s:
                for chunk in streams[cid]:
                    s.send(chunk)
                s.mark_done()

    ids = sorted(streams)
    threads = [threading.Thread(target=gateway_thread, args=(ids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


async def test_sync_publisher_from_many_threads_follows_the_record_contract(broker: str) -> None:
    settings = await _settings(broker)
    streams = {f"sync-{i}": fake_chunks(f"sync-{i}", ["w"] * (3 + i)) for i in range(12)}

    def run() -> SyncPublisher:
        with SyncPublisher(settings) as publisher:
            _publish_from_threads(publisher, streams)
        return publisher

    publisher = await asyncio.to_thread(run)
    total = sum(len(c) for c in streams.values())
    stats = publisher.stats
    assert (stats.chunks, stats.streams, stats.failed) == (total, 12, 0)
    assert stats.delivered == stats.accepted == total + 12
    grouped = _by_key(await _read_all(settings, total + 12))
    assert set(grouped) == {cid.encode() for cid in streams}
    for cid, chunks in streams.items():
        *records, end = grouped[cid.encode()]
        assert [m.seq for _, _, m in records] == list(range(len(chunks)))  # placeholder first
        assert [json.loads(v) for _, v, _ in records] == chunks
        assert (end[2].end_reason, end[2].end_count) == ("done", len(chunks))
        assert all(m.tenant == "sync" and m.started_at_ms == 1000 for _, _, m in records)
        (response,) = assemble_many(parse_chunk(v) for _, v, _ in records)
        assert response.chunkstitch.status == "complete"
    with pytest.raises(PublishError, match="not started"):
        publisher.stream().send(streams["sync-0"][1])


async def test_sync_publisher_at_a_dead_broker_fails_fast() -> None:
    publisher = SyncPublisher(Settings(broker="127.0.0.1:1", connect_timeout_s=1))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        await asyncio.to_thread(publisher.start)
    assert time.monotonic() - started < 10
    assert not any(t.name == "chunkstitch-publisher" for t in threading.enumerate())


async def test_sync_delivery_failure_goes_to_the_callback_or_is_raised(broker: str) -> None:
    settings = await _settings(broker)
    errors: list[DeliveryError] = []

    def with_callback() -> SyncPublisher:
        with SyncPublisher(settings, on_error=errors.append) as publisher:
            with publisher.stream() as s:
                s.send(fake_chunks("big-1", ["ok"])[1])
                s.send(_oversize("big-1"))
            publisher.flush(10)
        return publisher

    publisher = await asyncio.to_thread(with_callback)
    assert (publisher.stats.failed, publisher.stats.delivered) == (1, 2)
    assert [(e.key, e.seq) for e in errors] == [(b"big-1", 1)]

    def without_callback() -> None:
        publisher = SyncPublisher(settings)
        publisher.start()
        try:

            def stream_then_flush() -> None:
                with publisher.stream() as s:
                    s.send(_oversize("big-2"))
                publisher.flush(10)

            # raised by the next call into the publisher: the end marker's send or the
            # flush, whichever comes after the broker's answer (another thread runs it)
            with pytest.raises(DeliveryError, match="MessageSizeTooLarge"):
                stream_then_flush()
        finally:
            publisher.stop()

    await asyncio.to_thread(without_callback)


async def test_sync_broker_dying_mid_stream_bounds_the_buffer_and_reports_every_loss(
    tmp_path: Path,
) -> None:
    from processor.broker import EmbeddedBroker

    own = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    try:
        settings = (await _settings(own.bootstrap)).model_copy(
            update={
                "producer_buffer_max": 5,
                "producer_buffer_wait_s": 0.2,
                "producer_request_timeout_ms": 1500,
            }
        )
        errors: list[DeliveryError] = []
        publisher = SyncPublisher(settings, on_error=errors.append)
        await asyncio.to_thread(publisher.start)
        own.stop()  # the broker dies while the gateway is streaming
        waits: list[float] = []

        def stream() -> None:
            with publisher.stream() as s:
                for chunk in fake_chunks("cmpl-dead", ["w"] * 20)[1:]:
                    started = time.monotonic()
                    s.send(chunk)  # never blocks much longer than the buffer wait
                    waits.append(time.monotonic() - started)
            publisher.stop()

        await asyncio.to_thread(stream)
    finally:
        own.stop()
    stats = publisher.stats
    assert stats.delivered == 0
    assert stats.failed == stats.accepted == 24  # 23 chunks and the end marker
    assert len(errors) == stats.failed
    assert sum("buffer full" in str(e) for e in errors) >= 10
    assert max(waits) < 2


async def test_tee_chunks_sync_over_httpx_sse_iter_sse(broker: str) -> None:
    """The sync OpenAI-style path: httpx + httpx-sse ``iter_sse()`` data strings teed
    through a SyncPublisher; ``[DONE]`` ends the stream and is not published."""
    settings = await _settings(broker)
    async with running_server(fake_upstream_app()) as upstream_url:

        def gateway() -> list[str]:
            request = {"model": "m", "stream": True, "messages": [{"content": "a b c"}]}
            with (
                SyncPublisher(settings) as publisher,
                httpx.Client(timeout=30) as client,
                connect_sse(
                    client, "POST", upstream_url + "/v1/chat/completions", json=request
                ) as source,
            ):
                stream = publisher.stream(tenant="t")
                return [sse.data for sse in tee_chunks_sync(source.iter_sse(), stream)]

        forwarded = await asyncio.to_thread(gateway)
    assert forwarded[-1] == "[DONE]"
    chunks = [json.loads(d) for d in forwarded[:-1]]
    records = await _read_all(settings, len(chunks) + 1)
    *published, end = records
    assert [json.loads(v) for _, v, _ in published] == chunks
    assert (end[2].end_reason, end[2].end_count) == ("done", len(chunks))
