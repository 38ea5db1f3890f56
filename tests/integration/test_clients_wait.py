"""`wait_for(completion_id)` on the real embedded broker (ResponseWaiter / Consumer).

The finished-response records are produced here the way the worker writes them (key =
completion id, Kafka's default partitioner, value = ``ChatCompletion.to_json()``); the
whole path through the worker is in test_clients_worker.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from processor.clients import Consumer, ResponseWaiter, WaitTimeout, partition_for
from processor.core import assemble_many, parse_chunk
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks

pytestmark = pytest.mark.integration

PARTITIONS = 4


def _value(cid: str) -> bytes:
    (response,) = assemble_many(parse_chunk(c) for c in fake_chunks(cid, ["hi", cid]))
    return response.to_json()


async def _topic(broker: str) -> Settings:
    settings = Settings(
        broker=broker, topic_responses=f"wait-{uuid.uuid4().hex[:8]}", connect_timeout_s=5
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.topic_responses, PARTITIONS, 1)])
    finally:
        await admin.close()
    return settings


async def _produce(settings: Settings, ids: list[str]) -> dict[str, int]:
    """Produce responses keyed by id (default partitioner); returns id -> partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
    await producer.start()
    try:
        where = {}
        for cid in ids:
            meta = await producer.send_and_wait(
                settings.topic_responses, _value(cid), key=cid.encode()
            )
            where[cid] = meta.partition
        return where
    finally:
        await producer.stop()


async def test_wait_for_reads_only_the_ids_partition_from_now(broker: str) -> None:
    settings = await _topic(broker)
    # an old response of the same id is never what a new wait returns
    await _produce(settings, [f"old-{i}" for i in range(20)])
    async with ResponseWaiter(settings) as waiter:
        wanted = "cmpl-wait-1"
        task = asyncio.create_task(waiter.wait_for(wanted, timeout=30))
        await asyncio.sleep(0.5)  # the caller waits before the response exists
        paused = {tp.partition for tp in waiter._consumer.paused()}
        assert paused == set(range(PARTITIONS)) - {partition_for(wanted, PARTITIONS)}
        where = await _produce(settings, ["noise-a", wanted, "noise-b"])
        started = time.monotonic()
        response = await task
        latency = time.monotonic() - started
    assert where[wanted] == partition_for(wanted, PARTITIONS)  # same partitioner
    assert response.id == wanted
    assert response.choices[0].message.content == f"hi {wanted}"
    assert latency < 10
    # every partition is paused again once nobody waits
    assert not waiter._active


async def test_wait_for_since_finds_a_response_finished_before_the_call(broker: str) -> None:
    settings = await _topic(broker)
    t0 = time.time() - 1
    await _produce(settings, ["early-1", "early-2"])
    async with ResponseWaiter(settings) as waiter:
        with pytest.raises(WaitTimeout, match="early-1") as info:
            await waiter.wait_for("early-1", timeout=1)  # from now: it went by already
        assert "within 1 s" in str(info.value)
        got = await waiter.wait_for("early-1", timeout=20, since=t0)
        assert got.id == "early-1"
        # many concurrent waits share the reader
        ids = [f"many-{i}" for i in range(12)]
        waits = [asyncio.create_task(waiter.wait_for(c, timeout=30)) for c in ids]
        await asyncio.sleep(0.3)
        await _produce(settings, ids)
        assert [r.id for r in await asyncio.gather(*waits)] == ids


async def test_consumer_wait_for_does_not_disturb_its_iteration(broker: str) -> None:
    settings = await _topic(broker)
    await _produce(settings, ["it-1"])
    async with Consumer(settings, group_id=None, start="earliest", idle_timeout_s=3) as c:
        task = asyncio.create_task(c.wait_for("it-2", timeout=30))
        await asyncio.sleep(0.3)
        await _produce(settings, ["it-2"])
        assert (await task).id == "it-2"
        seen = [r.id async for r in c]
    assert sorted(seen) == ["it-1", "it-2"]
