"""Backlogs are not idleness, and the ledger is read only over the period it is used for.
Real embedded broker, real worker processes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from processor.settings import Settings
from processor.worker._ledger import read_ledger
from tests.helpers.worker import (
    WorkerProcess,
    isolated_settings,
    make_topics,
    produce,
    read_topic,
)
from topics import RecordMeta, encode_headers


def _backlog(streams: int, chunks: int) -> list[tuple[bytes, bytes, RecordMeta]]:
    """Streams interleaved across the whole backlog: every stream's chunks are spread
    over ~all of it, so a partition read far ahead of another would look idle."""
    out: list[tuple[bytes, bytes, RecordMeta]] = []
    for n in range(chunks + 1):
        for i in range(streams):
            cid = f"backlog-{i}"
            if n < chunks:
                finish = "stop" if n == chunks - 1 else None
                body = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "model": "m",
                    "choices": [
                        {"index": 0, "delta": {"content": f"{n} "}, "finish_reason": finish}
                    ],
                }
                out.append((cid.encode(), json.dumps(body).encode(), RecordMeta(seq=n)))
            else:
                out.append((cid.encode(), b"", RecordMeta(end_count=chunks, end_reason="done")))
    return out


async def _produce_at_rate(
    settings: Settings, records: list[tuple[bytes, bytes, RecordMeta]], per_ms: int
) -> None:
    """Publish with record timestamps as a gateway producing ``per_ms`` records per
    millisecond would have given them (the event time the worker judges a backlog by)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.broker, acks="all", linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    base = int(time.time() * 1000) - len(records) // per_ms - 1000
    try:
        futures = [
            await producer.send(
                settings.topic_chunks,
                value,
                key=key,
                headers=encode_headers(meta),
                timestamp_ms=base + i // per_ms,
            )
            for i, (key, value, meta) in enumerate(records)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_a_backlog_many_idle_timeouts_long_drains_with_no_incomplete_and_no_late_chunk(
    broker: str, tmp_path: Path
) -> None:
    # A stream's consecutive chunks are 16,000 records apart in the backlog: several idle
    # timeouts of draining at this machine's rate, 0.16 s at the gateway's.
    settings = isolated_settings(broker, tmp_path, idle_timeout_s=1.0, batch_max=1000)
    await make_topics(settings)
    streams, chunks = 16_000, 3
    records = _backlog(streams, chunks)  # 64,000 records
    await _produce_at_rate(settings, records, per_ms=100)
    started = time.monotonic()
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        got = await read_topic(settings, settings.topic_responses, until=streams, timeout_s=300)
        drained_s = time.monotonic() - started
        letters = await read_topic(
            settings, settings.topic_deadletter, until=1, timeout_s=2, distinct_keys=False
        )
    finally:
        worker.stop()
    statuses: dict[str, int] = {}
    for _, value in got:
        status = json.loads(value)["chunkstitch"]["status"]
        statuses[status] = statuses.get(status, 0) + 1
    # the drain must have taken several idle timeouts, or the test proves nothing
    assert drained_s > 3 * settings.idle_timeout_s, drained_s
    assert statuses == {"complete": streams}, statuses
    assert letters == []
    for _, value in got[:20]:
        body = json.loads(value)
        assert body["choices"][0]["message"]["content"] == "".join(f"{n} " for n in range(chunks))


async def test_the_ledger_is_read_from_the_period_it_is_used_for(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, emitted_memory_s=3600)
    await make_topics(settings)
    now_ms = int(time.time() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
    await producer.start()
    try:
        # 3,000 entries written 3 days .. 2 h ago, then 200 within the last hour
        for i in range(3000):
            ts = now_ms - (72 * 3600_000) + i * 60_000
            await producer.send(
                settings.topic_ledger,
                str(i).encode(),
                key=f"old-{i}".encode(),
                partition=1,
                timestamp_ms=min(ts, now_ms - 2 * 3600_000),
            )
        for i in range(200):
            await producer.send(
                settings.topic_ledger,
                str(i).encode(),
                key=f"new-{i}".encode(),
                partition=1,
                timestamp_ms=now_ms - 1800_000 + i * 1000,
            )
        await producer.flush()
    finally:
        await producer.stop()
    got = await read_ledger(settings, [1, 2], now_ms - 3600_000)
    keys = [r.key for r in got[1]]
    assert keys == [f"new-{i}".encode() for i in range(200)]
    assert got[2] == []


async def test_committed_offsets_reach_the_partition_ends_on_the_batch_path(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path)
    await make_topics(settings)
    records = _backlog(60, 5)
    await produce(settings, records)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await read_topic(settings, settings.topic_responses, until=60, timeout_s=60)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, group_id=settings.app_id)
        await consumer.start()
        try:
            tps = [TopicPartition(settings.topic_chunks, p) for p in range(settings.partitions)]
            ends = dict.fromkeys(tps, 0)
            probe = AIOKafkaConsumer(bootstrap_servers=settings.broker, group_id=None)
            await probe.start()
            try:
                probe.assign(tps)
                await probe.seek_to_beginning(*tps)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    batch = await probe.getmany(timeout_ms=200)
                    for tp, recs in batch.items():
                        ends[tp] = max(ends[tp], recs[-1].offset + 1)
                    if sum(ends.values()) >= len(records):
                        break
            finally:
                await probe.stop()
            committed: dict[TopicPartition, int | None] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                committed = {tp: await consumer.committed(tp) for tp in tps}
                if committed == ends:
                    break
                await asyncio.sleep(0.5)
            assert committed == ends
            # and the lag gauge agrees: nothing left to take on any partition
            lags: list[float] = []
            for _ in range(40):
                text = worker.get("/metrics").decode()
                lags = [
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("chunkstitch_consumer_lag{")
                ]
                if len(lags) == settings.partitions and not any(lags):
                    break
                await asyncio.sleep(0.25)
            assert len(lags) == settings.partitions
            assert not any(lags), lags
        finally:
            await consumer.stop()
    finally:
        worker.stop()
