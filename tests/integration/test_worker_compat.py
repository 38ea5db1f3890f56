"""The same round trip on a second Kafka-protocol broker with Kafka's exact offset,
idempotence and transaction semantics: librdkafka's mock cluster (confluent-kafka wheel).
It has no topic-creation admin API, so topics are created by producing to them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.worker import WorkerProcess, isolated_settings, produce, read_quiet, read_topic
from tests.integration._streams import build_streams, comparable, expected, wire

MOCK_PARTITIONS = 4  # what the mock cluster gives an auto-created topic


@pytest.fixture(scope="module")
def mock_cluster() -> Iterator[str]:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    holder = confluent_kafka.Producer(
        {"test.mock.num.brokers": 1, "bootstrap.servers": "", "log_level": 3}
    )
    broker = next(iter(holder.list_topics(timeout=10).brokers.values()))
    yield f"{broker.host}:{broker.port}"
    holder.flush(5)


async def test_round_trip_on_librdkafka_mock_cluster(mock_cluster: str, tmp_path: Path) -> None:
    settings = isolated_settings(mock_cluster, tmp_path, partitions=MOCK_PARTITIONS)
    streams = build_streams(60, seed=41, prefix="compat")
    # Create every topic by producing to it (the first record of each is a harmless dead
    # letter / ledger entry for an id no stream uses).
    from topics import RecordMeta

    for topic in (settings.topic_responses, settings.topic_deadletter, settings.topic_ledger):
        await produce(settings, [(b"warm-up", b"{}", RecordMeta())], topic=topic)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start(ready_timeout_s=60)
    try:
        await produce(settings, wire(streams, seed=42))
        await read_topic(settings, settings.topic_responses, until=len(streams) + 1, timeout_s=60)
        got = await read_quiet(settings, settings.topic_responses)
    finally:
        worker.stop()
    by_id = {}
    for key, value in got:
        if key == b"warm-up":
            continue
        body = json.loads(value)
        assert by_id.setdefault(key, body) == body
    assert len(by_id) == len(streams)
    for s in streams:
        assert comparable(by_id[s.completion_id.encode()]) == expected(s)
