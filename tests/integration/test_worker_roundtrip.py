"""The worker on the real embedded broker: round trip, bare records, dead letters."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.helpers.worker import (
    WorkerProcess,
    isolated_settings,
    make_topics,
    produce,
    read_topic,
)
from tests.integration._streams import build_streams, comparable, expected, wire
from topics import RecordMeta


async def test_round_trip_interleaved_duplicated_reordered(broker: str, tmp_path: Path) -> None:
    settings = isolated_settings(broker, tmp_path)
    await make_topics(settings)
    streams = build_streams(300, seed=11, prefix="rt")
    records = wire(streams, seed=12)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await produce(settings, records)
        got = await read_topic(settings, settings.topic_responses, until=len(streams))
    finally:
        worker.stop()
    by_id = {}
    for key, value in got:
        assert key is not None
        body = json.loads(value)
        if key in by_id:
            assert by_id[key] == body, "a completion was emitted twice with different content"
        by_id[key] = body
    assert len(by_id) == len(streams)
    dups = 0
    for s in streams:
        body = by_id[s.completion_id.encode()]
        assert comparable(body) == expected(s), s.completion_id
        meta = body["chunkstitch"]
        assert meta["tenant"] == s.tenant
        assert meta["provider"] == s.provider
        assert meta["chunk_count"] == len(s.chunks)
        assert meta["source"]["topic"] == settings.topic_chunks
        dups += meta["duplicates_dropped"]
    assert dups > 0, "the workload must contain duplicates"


async def test_bare_records_without_headers_or_key(broker: str, tmp_path: Path) -> None:
    """A gateway writing raw chunk JSON: no key, no headers. The worker re-keys each record
    by the chunk's id (Kafka orders records only within a partition, so the test writes
    them all to one partition, as a single-partition raw topic would)."""
    settings = isolated_settings(broker, tmp_path, usage_grace_s=0.3)
    await make_topics(settings)
    streams = build_streams(20, seed=5, prefix="bare")
    records = [(None, json.dumps(c).encode(), RecordMeta()) for s in streams for c in s.chunks]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await produce(settings, records, partition=0)
        got = await read_topic(settings, settings.topic_responses, until=len(streams))
    finally:
        worker.stop()
    by_id = {key: json.loads(value) for key, value in got}
    assert len(by_id) == len(streams)
    for s in streams:
        assert comparable(by_id[s.completion_id.encode()]) == expected(s)


async def test_bad_input_goes_to_dead_letters_and_good_records_still_flow(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, max_record_bytes=4096)
    await make_topics(settings)
    good = build_streams(3, seed=9, prefix="good")
    bad = [
        (b"k1", b"\xff\xfe\x00not json", RecordMeta()),
        (b"k2", b'{"object": "chat.completion.chunk"}', RecordMeta()),
        (b"k3", b'{"id": "x", "choices": "nope"}', RecordMeta()),
        (b"k4", b"[1, 2, 3]", RecordMeta()),
        (b"k5", b'{"id": "big", "choices": [], "pad": "' + b"x" * 5000 + b'"}', RecordMeta()),
        (b"k6", b"", RecordMeta(end_count=3, end_reason="done")),
    ]
    # A malformed header, produced raw.
    first = wire(good[:1], seed=1, dup_rate=0, swap_rate=0)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        await produce(settings, bad)
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        await producer.send_and_wait(
            settings.topic_chunks,
            b'{"id":"h","choices":[]}',
            key=b"k7",
            headers=[("cs-seq", b"x1")],
        )
        await producer.stop()
        await produce(settings, wire(good, seed=2))
        responses = await read_topic(settings, settings.topic_responses, until=len(good))
        # A late chunk: the first good completion was emitted already.
        late_key, late_value, _ = first[0]
        await produce(settings, [(late_key, late_value, RecordMeta(seq=99))])
        letters = await read_topic(
            settings, settings.topic_deadletter, until=len(bad) + 2, distinct_keys=False
        )
        metrics = worker.get("/metrics").decode()
    finally:
        worker.stop()
    assert {json.loads(v)["id"] for _, v in responses} == {s.completion_id for s in good}
    reasons = {json.loads(v)["reason"] for _, v in letters}
    assert reasons == {
        "not_json",
        "no_id",
        "wrong_type",
        "not_an_object",
        "oversize",
        "orphan_end_marker",
        "bad_header",
        "late_chunk",
    }
    for _, value in letters:
        letter = json.loads(value)
        assert letter["source_topic"] == settings.topic_chunks
        assert letter["message"]
        assert base64.b64decode(letter["value_b64"]) is not None
    wrong = next(json.loads(v) for _, v in letters if json.loads(v)["reason"] == "wrong_type")
    assert "choices" in wrong["message"]
    assert 'chunkstitch_dead_letters_total{reason="late_chunk"} 1.0' in metrics
