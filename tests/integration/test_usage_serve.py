"""The usage server on the real broker: it starts after rollups were published and still
reads every one of them, and rollups written while it seeks its start are read too (asking
for the end after "nothing that new" once skipped them: /usage missed the first
completions of a worker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from processor.usage._serve import ServiceProcess, ServiceThread, UsageService
from processor.usage._view import UsageQuery, _partitions
from tests.helpers.rollups import rollup
from tests.helpers.worker import isolated_settings, make_topics

MIN = 60_000
HOUR = 3_600_000


def _record(start: int, size: int, tenant: str, partition: int, n: int) -> tuple[bytes, bytes]:
    key, value = rollup(start, n, tenant=tenant, size=size, partition=partition)
    return key.encode(), value.model_dump_json().encode()


async def _first_answer(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """The first 200 of a usage server that is still starting: listening, then caught up
    with its topics (503 meanwhile); 30 s at most."""
    got = None
    for _ in range(120):
        try:
            got = await client.get(url)
        except httpx.ConnectError:
            got = None
        if got is not None and got.status_code == 200:
            break
        await asyncio.sleep(0.25)
    assert got is not None, "the usage server never listened"
    assert got.status_code == 200, got.text
    return got


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
            got = await _first_answer(
                client, f"http://127.0.0.1:{unused_tcp_port}/usage?window=1m&by=tenant"
            )
            minutes = {r["key"]["tenant"]: r["totals"]["requests"] for r in got.json()["rows"]}
            hours = (
                await client.get(f"http://127.0.0.1:{unused_tcp_port}/usage?window=1h&by=tenant")
            ).json()["rows"]
    finally:
        service.stop()
    assert minutes == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert {r["key"]["tenant"]: r["totals"]["requests"] for r in hours} == {"a": 7}


class _WritesWhileAsked:
    """A real consumer whose answers to the start search (the partitions' ends, then the
    times) are each followed by new rollups before the caller goes on: the interleaving
    of a worker's first publish with its usage server's start."""

    def __init__(self, consumer: AIOKafkaConsumer, write: Any) -> None:
        self._consumer = consumer
        self._write = write
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    async def end_offsets(self, parts: list[Any]) -> Any:
        answer = await self._consumer.end_offsets(parts)
        self.asked.append("end_offsets")
        await self._write()
        return answer

    async def offsets_for_times(self, since: dict[Any, int]) -> Any:
        answer = await self._consumer.offsets_for_times(since)
        self.asked.append("offsets_for_times")
        await self._write()
        return answer


async def test_rollups_written_while_the_view_seeks_are_read(broker: str, tmp_path: Path) -> None:
    settings = isolated_settings(broker, tmp_path, partitions=2)
    await make_topics(settings)
    minute = int(time.time() * 1000) // MIN * MIN
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all", linger_ms=20)
    await producer.start()

    async def write() -> None:  # a batch of two on partition 0, a single one on 1
        acks = [
            await producer.send(settings.topic_rollups, v, key=k, partition=p)
            for k, v, p in (
                (*_record(minute, MIN, "a", 0, 1), 0),
                (*_record(minute, MIN, "b", 0, 2), 0),
                (*_record(minute, MIN, "c", 1, 3), 1),
            )
        ]
        await asyncio.gather(*acks)

    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = _partitions(settings)
        consumer.assign(parts)
        service = UsageService(settings)
        racing = _WritesWhileAsked(consumer, write)
        await service._seek_to_period(racing, parts)
        assert racing.asked, "the start search asked the broker nothing: the race is untested"
        view = service.view
        for _ in range(50):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                view.apply_records((r.key, r.value) for r in records)
            if view.records >= 3 * len(racing.asked):
                break
    finally:
        await consumer.stop()
        await producer.stop()
    query = UsageQuery.parse({"window": "1m", "by": "tenant"})
    got = {r["key"]["tenant"]: r["totals"]["requests"] for r in view.query(query)["rows"]}
    assert got == {"a": 1, "b": 2, "c": 3}  # each write re-publishes the same totals


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of ``pid`` (/proc/PID/task/TID/stat field 19)."""
    out = set()
    for tid in Path(f"/proc/{pid}/task").iterdir():
        out.add(int((tid / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return out


async def test_the_usage_server_process_runs_at_the_niceness_asked_for(
    broker: str, tmp_path: Path, unused_tcp_port: int
) -> None:
    settings = isolated_settings(
        broker, tmp_path, partitions=1, usage_port=unused_tcp_port, usage_server_nice=7
    )
    await make_topics(settings)
    service = ServiceProcess(settings)
    service.start()
    assert service.proc is not None
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            got = await _first_answer(client, f"http://127.0.0.1:{unused_tcp_port}/usage")
        assert got.json()["rows"] == []
        assert _niceness(service.proc.pid) == {7}
    finally:
        service.stop()
