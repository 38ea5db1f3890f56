"""The usage server on the real broker: it starts after rollups were published and still
reads every one of them (a start offset from a wrong ListOffsets answer once made it
skip them, so /usage missed the first completions of a worker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from processor.core import result
from processor.usage._serve import ServiceThread
from tests.helpers.worker import isolated_settings, make_topics
from topics import UsageKey, UsageTotals

MIN = 60_000
HOUR = 3_600_000


def _record(start: int, size: int, tenant: str, partition: int, n: int) -> tuple[bytes, bytes]:
    key = UsageKey(
        window_start_ms=start,
        window_ms=size,
        tenant=tenant,
        model="m",
        provider="p",
        status="complete",
    )
    rollup = result(key, UsageTotals(requests=n, complete=n), partition)
    return key.record_key(partition, None).encode(), rollup.model_dump_json().encode()


async def test_a_late_starting_usage_server_reads_the_rollups_already_written(
    broker: str, tmp_path: Path, unused_tcp_port: int
) -> None:
    settings = isolated_settings(broker, tmp_path, partitions=2, usage_port=unused_tcp_port)
    await make_topics(settings)
    now = int(time.time() * 1000)
    minute, hour = now // MIN * MIN, now // HOUR * HOUR
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        # one record per request (separate batches) and a batch of two: every layout
        for i, tenant in enumerate(["a", "b", "c"]):
            key, value = _record(minute, MIN, tenant, 0, i + 1)
            await producer.send_and_wait(settings.topic_rollups, value, key=key, partition=0)
        batch = [
            await producer.send(settings.topic_rollups, v, key=k, partition=1)
            for k, v in (_record(minute, MIN, "d", 1, 4), _record(minute, MIN, "e", 1, 5))
        ]
        batch.append(
            await producer.send(
                settings.rollups_hourly_topic,
                _record(hour, HOUR, "a", 0, 7)[1],
                key=_record(hour, HOUR, "a", 0, 7)[0],
                partition=0,
            )
        )
        await asyncio.gather(*batch)
    finally:
        await producer.stop()

    service = ServiceThread(settings)
    service.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(120):  # the server listens and its view catches up (or 30 s)
                try:
                    got = await client.get(
                        f"http://127.0.0.1:{unused_tcp_port}/usage?window=1m&by=tenant"
                    )
                except httpx.ConnectError:
                    got = None
                if got is not None and got.status_code == 200:
                    break
                await asyncio.sleep(0.25)
            assert got is not None, "the usage server never listened"
            assert got.status_code == 200, got.text
            minutes = {r["key"]["tenant"]: r["totals"]["requests"] for r in got.json()["rows"]}
            hours = (
                await client.get(f"http://127.0.0.1:{unused_tcp_port}/usage?window=1h&by=tenant")
            ).json()["rows"]
    finally:
        service.stop()
    assert minutes == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert {r["key"]["tenant"]: r["totals"]["requests"] for r in hours} == {"a": 7}
