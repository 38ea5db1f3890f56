"""Publisher, `chunkstitch publish` and the example gateway on the real embedded broker.

These tests need no worker: they read the raw records back with aiokafka and check the
record contract (keys, headers, values, end markers), and that the values assemble to
the same responses as the chunks that went in (``assemble_many``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from openai.types.chat import ChatCompletionChunk as OpenAIChunk

from examples.gateway import GatewaySettings, create_app
from processor.clients import BrokerUnavailable, DeliveryError, Publisher, UnknownTopic
from processor.core import assemble_many, parse_chunk
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks, fake_upstream_app, running_server
from topics import RecordMeta, decode_headers

pytestmark = pytest.mark.integration

Record = tuple[bytes | None, bytes, RecordMeta]


async def _settings(broker: str, partitions: int = 3) -> Settings:
    """Settings with a fresh chunk topic (created here) so tests never share records."""
    settings = Settings(
        broker=broker,
        topic_chunks=f"chunks-{uuid.uuid4().hex[:8]}",
        session_timeout_s=3,
        connect_timeout_s=5,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topic_chunks, partitions, 1)])
    finally:
        await admin.close()
    return settings


async def _read_all(settings: Settings, expected: int) -> list[Record]:
    """Every record of the chunk topic (bounded: at most 15 s of polling)."""
    consumer = AIOKafkaConsumer(
        settings.topic_chunks,
        bootstrap_servers=settings.broker,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Record] = []
    try:
        for _ in range(30):
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                out.extend((r.key, r.value, decode_headers(r.headers)) for r in records)
            if len(out) >= expected:
                break
    finally:
        await consumer.stop()
    return out


def _by_key(records: list[Record]) -> dict[bytes | None, list[Record]]:
    grouped: dict[bytes | None, list[Record]] = defaultdict(list)
    for record in records:
        grouped[record[0]].append(record)
    return grouped


def _words_stream(cid: str, words: list[str]) -> list[dict[str, Any]]:
    return fake_chunks(cid, words)


async def test_publish_dicts_and_openai_objects_follow_the_record_contract(broker: str) -> None:
    settings = await _settings(broker)
    dict_chunks = _words_stream("cmpl-dict", ["hello", "from", "dicts"])
    obj_chunks = [
        OpenAIChunk.model_validate(c)
        for c in _words_stream("cmpl-obj", ["hello", "from", "objects"])[1:]  # no placeholder
    ]
    raw_chunks = [json.dumps(c).encode() for c in _words_stream("cmpl-raw", ["raw", "bytes"])]
    async with Publisher(settings) as publisher:
        async with publisher.stream(tenant="acme", provider="azure", request_started_at=10) as s:
            for chunk in dict_chunks:
                await s.send(chunk)
            s.mark_done()
        async with publisher.stream(tenant="acme", provider="openai") as s:
            for obj in obj_chunks:
                await s.send(obj)
        async with publisher.stream(provider="raw") as s:
            for raw in raw_chunks:
                await s.send(raw)
    assert publisher.stats.failed == 0
    assert publisher.stats.delivered == publisher.stats.accepted

    total = len(dict_chunks) + len(obj_chunks) + len(raw_chunks) + 3
    grouped = _by_key(await _read_all(settings, total))
    assert set(grouped) == {b"cmpl-dict", b"cmpl-obj", b"cmpl-raw"}  # never b"" or None

    for key, sent in ((b"cmpl-dict", dict_chunks), (b"cmpl-obj", obj_chunks)):
        records = grouped[key]
        *chunks, end = records
        assert [m.seq for _, _, m in chunks] == list(range(len(sent)))
        assert end[1] == b""
        assert end[2].end_count == len(sent)
        assert all(m.tenant == "acme" for _, _, m in records)
    assert grouped[b"cmpl-dict"][-1][2].end_reason == "done"
    assert grouped[b"cmpl-obj"][-1][2].end_reason == "closed"
    assert grouped[b"cmpl-dict"][0][2].started_at_ms == 10_000
    # Azure's placeholder (id "") went out first, under the completion's key.
    assert json.loads(grouped[b"cmpl-dict"][0][1])["id"] == ""
    # bytes are published exactly as received
    assert [v for _, v, m in grouped[b"cmpl-raw"] if not m.is_end_marker] == raw_chunks
    # openai objects: snake_case JSON of the fields that were set
    first_obj = json.loads(grouped[b"cmpl-obj"][0][1])
    assert first_obj["choices"][0]["delta"] == {"role": "assistant", "content": ""}

    # The published values assemble to exactly what the original chunks assemble to.
    published = [
        parse_chunk(v) for recs in grouped.values() for _, v, m in recs if not m.is_end_marker
    ]
    originals = [
        parse_chunk(c)
        for c in [
            *dict_chunks,
            *(o.model_dump(exclude_unset=True) for o in obj_chunks),
            *raw_chunks,
        ]
    ]
    expected = {r.id: r for r in assemble_many(originals)}
    got = {r.id: r for r in assemble_many(published)}
    assert got == expected
    assert got["cmpl-obj"].choices[0].message.content == "hello from objects"


async def test_aborted_stream_sends_an_aborted_end_marker(broker: str) -> None:
    settings = await _settings(broker)

    async def gateway_handler(publisher: Publisher) -> None:
        async with publisher.stream(tenant="t") as s:
            await s.send(_words_stream("cmpl-abort", ["partial"])[1])
            await s.send(_words_stream("cmpl-abort", ["partial"])[2])
            raise RuntimeError("gateway failed mid-stream")

    async with Publisher(settings) as publisher:
        with pytest.raises(RuntimeError, match="mid-stream"):
            await gateway_handler(publisher)
    records = await _read_all(settings, 3)
    assert [r[0] for r in records] == [b"cmpl-abort"] * 3
    end = records[-1][2]
    assert end.end_reason == "aborted"
    assert end.end_count == 2


async def test_publisher_at_a_dead_broker_fails_fast_with_a_clear_error() -> None:
    settings = Settings(broker="127.0.0.1:1", connect_timeout_s=3)
    publisher = Publisher(settings)
    with pytest.raises(BrokerUnavailable) as info:
        await asyncio.wait_for(publisher.start(), 30)  # bound: the test must not hang
    message = str(info.value)
    assert "127.0.0.1:1" in message
    assert "CHUNKSTITCH_BROKER" in message


async def test_publisher_names_the_missing_topic_and_the_fix(broker: str) -> None:
    settings = Settings(broker=broker, topic_chunks="no-such-topic-" + uuid.uuid4().hex[:6])
    with pytest.raises(UnknownTopic, match="chunkstitch topics create"):
        await Publisher(settings).start()


def _cli(args: list[str], broker: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CHUNKSTITCH_BROKER": broker, "CHUNKSTITCH_CONNECT_TIMEOUT_S": "3"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_publish_groups_interleaved_sse_streams(broker: str, tmp_path: Path) -> None:
    settings = await _settings(broker)
    a = _words_stream("cmpl-a", ["one", "two", "three"])
    b = _words_stream("cmpl-b", ["uno", "dos"])[1:]
    interleaved: list[dict[str, Any]] = []
    for i in range(len(a) + 2):  # a (with its leading Azure placeholder) starts first
        interleaved.extend([a[i]] if i < len(a) else [])
        interleaved.extend([b[i - 2]] if 0 <= i - 2 < len(b) else [])
    capture = tmp_path / "capture.sse"
    capture.write_text(
        "".join(f"data: {json.dumps(c)}\n\n" for c in interleaved) + "data: [DONE]\n\n"
    )
    result = await asyncio.to_thread(
        _cli,
        ["publish", str(capture), "--tenant", "cli", "--provider", "openai", "--keep-ids"],
        broker,
        CHUNKSTITCH_TOPIC_CHUNKS=settings.topic_chunks,
    )
    assert result.returncode == 0, result.stderr
    assert f"sent {len(a) + len(b)} chunk(s) in 2 stream(s)" in result.stdout

    grouped = _by_key(await _read_all(settings, len(a) + len(b) + 2))
    assert set(grouped) == {b"cmpl-a", b"cmpl-b"}
    for key, sent in ((b"cmpl-a", a), (b"cmpl-b", b)):
        *chunks, end = grouped[key]
        assert [json.loads(v) for _, v, _ in chunks] == sent
        assert [m.seq for _, _, m in chunks] == list(range(len(sent)))
        assert end[2].end_count == len(sent)
        assert all(m.tenant == "cli" and m.provider == "openai" for _, _, m in grouped[key])
    assert {grouped[k][-1][2].end_reason for k in grouped} <= {"done", "closed"}


async def test_cli_publish_reports_bad_lines_and_a_dead_broker(broker: str, tmp_path: Path) -> None:
    settings = await _settings(broker)
    capture = tmp_path / "mixed.jsonl"
    capture.write_text(json.dumps(_words_stream("cmpl-j", ["x"])[1]) + "\nnot json at all\n")
    result = await asyncio.to_thread(
        _cli, ["publish", str(capture)], broker, CHUNKSTITCH_TOPIC_CHUNKS=settings.topic_chunks
    )
    assert result.returncode == 1
    assert "line 2" in result.stderr
    assert "sent 1 chunk(s) in 1 stream(s)" in result.stdout

    dead = await asyncio.to_thread(_cli, ["publish", str(capture)], "127.0.0.1:1")
    assert dead.returncode == 2
    assert "127.0.0.1:1" in dead.stderr
    assert "CHUNKSTITCH_BROKER" in dead.stderr


async def test_example_gateway_streams_unchanged_and_publishes_every_chunk(broker: str) -> None:
    settings = await _settings(broker)
    upstream = fake_upstream_app()
    async with running_server(upstream) as upstream_url:
        gateway = create_app(
            GatewaySettings(upstream_url=upstream_url + "/v1", gateway_provider="fake"), settings
        )
        async with (
            running_server(gateway) as gateway_url,
            httpx.AsyncClient(base_url=gateway_url, timeout=30) as client,
        ):
            request = {
                "model": "fake-model",
                "stream": True,
                "messages": [{"role": "user", "content": "the quick brown fox"}],
            }
            via_gateway = b""
            async with client.stream(
                "POST", "/v1/chat/completions", json=request, headers={"X-Tenant": "gw"}
            ) as response:
                assert response.status_code == 200
                returned = response.headers
                async for piece in response.aiter_bytes():
                    via_gateway += piece
            async with httpx.AsyncClient(timeout=30) as direct:
                direct_body = (
                    await direct.post(upstream_url + "/v1/chat/completions", json=request)
                ).content
            # a client that asks for usage itself gets the usage chunk
            asked = {**request, "stream_options": {"include_usage": True}}
            with_usage = (await client.post("/v1/chat/completions", json=asked)).content
            metrics = (await client.get("/metrics")).text
    # The upstream's response headers reach the client.
    n = via_gateway.split(b"chatcmpl-fake-", 1)[1].split(b'"', 1)[0].decode()
    assert returned["x-request-id"] == f"req-{n}"  # the upstream's, for this request
    assert returned["openai-processing-ms"] == "7"
    # The gateway asked the upstream for usage, the client did not: the usage-only chunk
    # is published but not forwarded, so the client saw exactly what the upstream sends
    # without include_usage (ids differ per call).
    assert upstream.state.seen[0]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in upstream.state.seen[1]
    assert via_gateway.replace(b"fake-1", b"fake-X") == direct_body.replace(b"fake-2", b"fake-X")
    assert b'"usage"' not in via_gateway
    assert b'"usage": {"prompt_tokens"' in with_usage
    assert "chunkstitch_publisher_failed_total" in metrics

    sent = [json.loads(line[6:]) for line in via_gateway.split(b"\n\n") if line[6:7] == b"{"]
    records = await _read_all(settings, len(sent) + 1 + len(sent) + 2)
    grouped = _by_key(records)
    cid = sent[-1]["id"].encode()
    *chunks, end = grouped[cid]
    *published, usage_chunk = [json.loads(v) for _, v, _ in chunks]
    assert published == sent
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert end[2].end_reason == "done"
    assert end[2].end_count == len(sent) + 1
    assert all(m.tenant == "gw" and m.provider == "fake" for _, _, m in grouped[cid])
    assert all(m.started_at_ms is not None for _, _, m in grouped[cid])
    (response,) = assemble_many(parse_chunk(v) for _, v, _ in chunks)
    assert response.choices[0].message.content == "the quick brown fox"
    assert response.chunkstitch.status == "complete"
    assert response.chunkstitch.usage_reported is True


def _oversize(cid: str) -> dict[str, Any]:
    chunk = _words_stream(cid, ["x"])[2]
    chunk["choices"][0]["delta"]["content"] = "x" * (2 * 1024 * 1024)  # > max request size
    return chunk


async def test_delivery_failure_reaches_the_error_callback_and_is_counted(broker: str) -> None:
    settings = await _settings(broker)
    errors = []
    async with Publisher(settings, on_error=errors.append) as publisher:
        async with publisher.stream() as s:
            await s.send(_words_stream("cmpl-big", ["ok"])[1])
            await s.send(_oversize("cmpl-big"))
            await s.send(_words_stream("cmpl-big", ["ok"])[3])
        await publisher.flush()
    assert publisher.stats.failed == 1
    assert publisher.stats.delivered == 3  # two chunks and the end marker
    (error,) = errors
    assert error.seq == 1
    assert error.key == b"cmpl-big"
    assert "cmpl-big" in str(error)
    assert "MessageSizeTooLarge" in str(error)


async def test_delivery_failure_is_raised_without_a_callback(broker: str) -> None:
    settings = await _settings(broker)
    publisher = Publisher(settings)
    await publisher.start()
    try:
        async with publisher.stream() as s:
            await s.send(_oversize("cmpl-big2"))
        with pytest.raises(DeliveryError, match="not delivered"):
            await publisher.flush()
        assert publisher.stats.failed == 1
    finally:
        await publisher.stop()


async def test_example_gateway_client_disconnect_sends_an_aborted_marker(broker: str) -> None:
    settings = await _settings(broker)
    async with running_server(fake_upstream_app()) as upstream_url:
        gateway = create_app(GatewaySettings(upstream_url=upstream_url + "/v1"), settings)
        async with running_server(gateway) as gateway_url:
            request = {
                "model": "fake-model",
                "stream": True,
                "messages": [{"role": "user", "content": "hang on a moment"}],
            }
            async with (
                httpx.AsyncClient(base_url=gateway_url, timeout=30) as client,
                client.stream("POST", "/v1/chat/completions", json=request) as response,
            ):
                received = b""
                async for piece in response.aiter_bytes():
                    received += piece
                    if received.count(b"\n\n") >= 3:  # keep-alive + two chunks
                        break
            # the client hung up mid-stream; the gateway must end the stream as aborted
            records = await _read_all(settings, 3)
    assert len(records) == 3
    *chunks, end = records
    assert [m.seq for _, _, m in chunks] == [0, 1]
    assert end[2].end_reason == "aborted"
    assert end[2].end_count == 2


async def test_broker_dying_mid_stream_bounds_the_buffer_and_reports_every_loss(
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
        publisher = Publisher(settings, on_error=errors.append)
        await publisher.start()
        own.stop()  # the broker dies while the gateway is streaming
        chunks = _words_stream("cmpl-dead", ["w"] * 20)[1:]
        async with publisher.stream() as s:
            for chunk in chunks:
                await s.send(chunk)  # never blocks longer than the buffer wait
        await publisher.stop()
    finally:
        own.stop()
    stats = publisher.stats
    assert stats.delivered == 0
    assert stats.failed == stats.accepted  # every chunk and the end marker: counted
    assert len(errors) == stats.failed
    assert any("buffer full" in str(e) for e in errors)
    assert all(str(settings.broker) in str(e) for e in errors)


async def test_publisher_at_a_silent_broker_gives_up_after_the_connect_timeout() -> None:
    import socket

    with socket.socket() as silent:  # accepts TCP connections, never answers Kafka
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        publisher = Publisher(Settings(broker=address, connect_timeout_s=1))
        with pytest.raises(BrokerUnavailable) as info:
            await asyncio.wait_for(publisher.start(), 30)  # bound: the test must not hang
    assert address in str(info.value)
    assert "no answer within 1 s" in str(info.value)
