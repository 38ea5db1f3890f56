"""Backlogs are not idleness, and the ledger is read only over the period it is used for.
Real embedded broker, real worker processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from processor.settings import Settings
from processor.worker._ledger import read_ledger
from processor.worker._stitcher import Stitcher
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
    got: dict[int, list[bytes | None]] = {}
    count = await read_ledger(
        settings,
        [1, 2],
        now_ms - 3600_000,
        lambda p, recs: got.setdefault(p, []).extend(r.key for r in recs),
    )
    assert got == {1: [f"new-{i}".encode() for i in range(200)]}
    assert count == 200


async def _write_ledger(settings: Settings, partition: int, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.topic_ledger,
                str(i).encode(),
                key=f"chatcmpl-{i:024d}".encode(),
                partition=partition,
            )
            for i in range(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_the_ledger_is_folded_fetch_by_fetch_in_offset_order_and_not_kept(
    broker: str, tmp_path: Path
) -> None:
    # 60,000 entries of a gateway-sized id, handed over 10,000 at most at a time
    settings = isolated_settings(broker, tmp_path, emitted_memory_s=3600)
    await make_topics(settings)
    await _write_ledger(settings, 0, 60_000)
    batches: list[tuple[int, int, int, int]] = []  # partition, size, first, last offset

    def fold(partition: int, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        batches.append((partition, len(records), records[0].offset, records[-1].offset))
        offsets = [r.offset for r in records]
        assert offsets == sorted(offsets)

    since_ms = int(time.time() * 1000) - 3600_000
    count = await read_ledger(settings, [0, 1], since_ms, fold, batch_records=10_000)
    assert count == 60_000  # the read hands everything over and returns only a count
    assert len(batches) >= 6, batches
    assert {p for p, *_ in batches} == {0}
    assert max(size for _, size, *_ in batches) <= 10_000
    # offset order across the batches too, with no gap and no repeat
    assert batches[0][2] == 0
    assert batches[-1][3] == 59_999
    assert all(a[3] + 1 == b[2] for a, b in itertools.pairwise(batches))


async def test_a_partition_no_longer_wanted_is_no_longer_read(broker: str, tmp_path: Path) -> None:
    settings = isolated_settings(broker, tmp_path, emitted_memory_s=3600)
    await make_topics(settings)
    await _write_ledger(settings, 0, 60_000)
    await _write_ledger(settings, 1, 200)
    revoked: set[int] = set()
    folded: dict[int, int] = {}

    def fold(partition: int, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        assert partition not in revoked
        folded[partition] = folded.get(partition, 0) + len(records)
        if partition == 0:
            revoked.add(0)  # revoked after its first batch (as a rebalance would)

    since_ms = int(time.time() * 1000) - 3600_000
    count = await read_ledger(settings, [0, 1], since_ms, fold, wanted=lambda p: p not in revoked)
    assert 0 < folded[0] < 60_000  # its first batch only
    assert folded[1] == 200  # the others are read to their end
    assert count == folded[0] + 200


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


async def test_a_partition_revoked_while_its_ledger_loads_is_loaded_afresh_when_reassigned(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, emitted_memory_s=3600)
    await make_topics(settings)
    await _write_ledger(settings, 0, 30_000)
    await _write_ledger(settings, 1, 200)

    async def send(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a ledger load sends nothing")

    stitcher = Stitcher(settings, send, time.monotonic)
    fold = stitcher._fold_ledger
    batches: list[tuple[int, int]] = []

    def fold_then_revoke(partition: int, part: Any, records: Any) -> None:
        batches.append((partition, len(records)))
        fold(partition, part, records)
        if [p for p, _ in batches].count(0) == 1 and partition == 0:
            stitcher.revoke([0])  # a rebalance during the read, after its first batch

    stitcher._fold_ledger = fold_then_revoke  # type: ignore[method-assign]
    await stitcher.preload([0, 1])
    assert 0 not in stitcher.parts  # revoked: what was read of it is dropped
    assert stitcher.parts[1].loaded
    assert len(stitcher.parts[1].ledger) == 200
    assert [p for p, _ in batches].count(0) == 1  # and its read went no further
    stitcher._fold_ledger = fold  # type: ignore[method-assign]
    stitcher.preload([0])  # assigned again
    part = await stitcher._partition(0)
    assert part.loaded
    assert len(part.ledger) == 30_000
    assert len(part.emitted) == 30_000
