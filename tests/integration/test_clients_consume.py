"""Consumer library and `chunkstitch consume` on the real embedded broker.

The finished-response records are produced here the way the worker writes them (key =
completion id, value = ``ChatCompletion.to_json()``), so these tests need no worker; the
full path through the worker is in test_clients_worker.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.clients import Consumer, InvalidRecord, UnknownTopic
from processor.core import assemble_many, parse_chunk
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks
from topics import ChatCompletion

pytestmark = pytest.mark.integration


def _response(cid: str, text: str, tenant: str, *, finished: bool = True) -> ChatCompletion:
    chunks = fake_chunks(cid, text.split())
    if not finished:
        chunks = chunks[:-2]  # cut off before the finish reason and usage
    (response,) = assemble_many(parse_chunk(c) for c in chunks)
    response.chunkstitch.tenant = tenant
    return response


async def _topic_with(broker: str, values: list[tuple[bytes, bytes | None]]) -> Settings:
    settings = Settings(
        broker=broker,
        topic_responses=f"responses-{uuid.uuid4().hex[:8]}",
        session_timeout_s=3,
        heartbeat_interval_s=0.5,
        connect_timeout_s=5,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topic_responses, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(settings.topic_responses, value, key=key)
    finally:
        await producer.stop()
    return settings


R1 = _response("r1", "first answer", "acme")
R2 = _response("r2", "second answer", "other")
R3 = _response("r3", "cut off answer here", "acme", finished=False)
R4 = _response("r4", "fourth answer", "acme")
RECORDS = [
    (b"r1", R1.to_json()),
    (b"r2", R2.to_json()),
    (b"r1", R1.to_json()),  # the worker re-emitted r1 after a crash: identical record
    (b"bad", b'{"id": "bad", "choices": "not a list"}'),  # does not validate
    (b"r3", R3.to_json()),
    (b"r4", R4.to_json()),
]


async def _all(consumer: Consumer) -> list[ChatCompletion]:
    return [response async for response in consumer]


async def test_consumer_yields_typed_responses_drops_duplicates_and_skips_invalid(
    broker: str,
) -> None:
    settings = await _topic_with(broker, RECORDS)
    async with Consumer(settings, group_id=None, start="earliest", idle_timeout_s=2) as consumer:
        got = await asyncio.wait_for(_all(consumer), 60)
    assert all(isinstance(r, ChatCompletion) for r in got)
    assert sorted(r.id for r in got) == ["r1", "r2", "r3", "r4"]
    assert {r.id: r for r in got}["r1"] == R1
    assert consumer.stats.duplicates == 1
    assert consumer.stats.invalid == 1
    assert consumer.stats.yielded == 4


async def test_consumer_filters_by_tenant_and_status(broker: str) -> None:
    settings = await _topic_with(broker, RECORDS)
    async with Consumer(
        settings, group_id=None, start="earliest", tenant="acme", idle_timeout_s=2
    ) as consumer:
        acme = await asyncio.wait_for(_all(consumer), 60)
    assert sorted(r.id for r in acme) == ["r1", "r3", "r4"]
    async with Consumer(
        settings, group_id=None, start="earliest", status="incomplete", idle_timeout_s=2
    ) as consumer:
        incomplete = await asyncio.wait_for(_all(consumer), 60)
    assert [r.id for r in incomplete] == ["r3"]
    assert incomplete[0].chunkstitch.status == "incomplete"


async def test_invalid_record_can_be_raised_and_the_loop_continues(broker: str) -> None:
    settings = await _topic_with(broker, [(b"bad", b"{not json"), (b"r1", R1.to_json())])
    consumer = Consumer(
        settings, group_id=None, start="earliest", idle_timeout_s=2, raise_invalid=True
    )
    async with consumer:
        with pytest.raises(InvalidRecord, match="not a finished response"):
            await asyncio.wait_for(consumer.__anext__(), 30)
        after = await asyncio.wait_for(consumer.__anext__(), 30)
    assert after.id == "r1"


async def test_offsets_are_committed_only_after_the_loop_body_finished(broker: str) -> None:
    settings = await _topic_with(broker, [(b"r1", R1.to_json())])
    settings = settings.model_copy(update={"commit_interval_s": 0.0})
    group = f"g-{uuid.uuid4().hex[:6]}"

    class BodyFailed(Exception):
        pass

    async def fail_in_body() -> None:
        async with Consumer(settings, group_id=group, idle_timeout_s=10) as consumer:
            async for _response in consumer:
                raise BodyFailed

    with pytest.raises(BodyFailed):
        await asyncio.wait_for(fail_in_body(), 60)

    # The body never finished with r1: the same group gets it again.
    async with Consumer(settings, group_id=group, idle_timeout_s=10) as consumer:
        again = await asyncio.wait_for(consumer.__anext__(), 60)
        assert again.id == "r1"
        assert consumer.stats.yielded == 1
    # close() committed the finished body of the second consumer: a third run sees nothing.
    async with Consumer(settings, group_id=group, idle_timeout_s=2) as consumer:
        rest = await asyncio.wait_for(_all(consumer), 60)
    assert rest == []


async def test_consumer_names_the_missing_topic_and_the_fix(broker: str) -> None:
    settings = Settings(broker=broker, topic_responses="missing-" + uuid.uuid4().hex[:6])
    with pytest.raises(UnknownTopic, match="chunkstitch topics create"):
        await Consumer(settings).start()


def _cli(args: list[str], settings: Settings) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CHUNKSTITCH_BROKER": settings.broker,
        "CHUNKSTITCH_TOPIC_RESPONSES": settings.topic_responses,
        "CHUNKSTITCH_CONNECT_TIMEOUT_S": "3",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "processor", "consume", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_consume_json_limit_timeout_and_table(broker: str) -> None:
    settings = await _topic_with(broker, RECORDS)
    limited = await asyncio.to_thread(
        _cli, ["--from-beginning", "--json", "--limit", "2", "--timeout", "10"], settings
    )
    assert limited.returncode == 0, limited.stderr
    lines = limited.stdout.splitlines()
    assert len(lines) == 2
    assert all(ChatCompletion.model_validate_json(line) for line in lines)

    everything = await asyncio.to_thread(
        _cli, ["--from-beginning", "--json", "--timeout", "2", "--tenant", "acme"], settings
    )
    assert everything.returncode == 0, everything.stderr
    ids = sorted(json.loads(line)["id"] for line in everything.stdout.splitlines())
    assert ids == ["r1", "r3", "r4"]

    table = await asyncio.to_thread(_cli, ["--from-beginning", "--timeout", "2"], settings)
    assert table.returncode == 0, table.stderr
    for rid in ("r1", "r2", "r3", "r4"):
        assert rid in table.stdout
    assert "incomplete" in table.stdout
    assert "4 response(s)" in table.stdout


async def test_cli_consume_errors_say_what_to_do(broker: str) -> None:
    missing = Settings(broker=broker, topic_responses="missing-" + uuid.uuid4().hex[:6])
    result = await asyncio.to_thread(_cli, ["--timeout", "1"], missing)
    assert result.returncode == 2
    assert "chunkstitch topics create" in result.stderr
    dead = await asyncio.to_thread(_cli, ["--timeout", "1"], Settings(broker="127.0.0.1:1"))
    assert dead.returncode == 2
    assert "127.0.0.1:1" in dead.stderr
    assert "CHUNKSTITCH_BROKER" in dead.stderr
