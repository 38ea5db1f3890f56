"""``chunkstitch usage`` reads what its query needs, on the real broker: the topic of its
window only, and with ``--since`` only the records written within the range (the start
found by record timestamps: the embedded broker answers ``offsets_for_times`` wrong)."""

from __future__ import annotations

import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from processor.usage import UsageQuery, load_view, query_rollups
from tests.helpers.rollups import rollup
from tests.helpers.worker import isolated_settings, make_topics

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000


async def test_a_query_reads_its_windows_topic_and_since_only_the_recent_records(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, partitions=2)
    await make_topics(settings)
    now = int(time.time() * 1000)
    old_ts = now - 3 * DAY_MS  # written three days ago, about windows of that time
    old = [  # many, so that the start is found by bisection, not by reading them
        (t, old_ts // s * s - i * s, s, f"old{i % 3}", 1 + i)
        for i in range(150)
        for t, s in ((settings.topic_rollups, MINUTE_MS), (settings.rollups_hourly_topic, HOUR_MS))
    ]
    recent_hour = (now - 30 * 60_000) // HOUR_MS * HOUR_MS
    recent_minute = (now - 10 * 60_000) // MINUTE_MS * MINUTE_MS
    recent = [
        (settings.topic_rollups, recent_minute, MINUTE_MS, "new", 5),
        (settings.topic_rollups, recent_minute, MINUTE_MS, "new", 7),
        (settings.rollups_hourly_topic, recent_hour, HOUR_MS, "new", 7),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=broker, acks="all")
    await producer.start()
    try:
        for batch, ts in ((old, old_ts), (recent, now)):
            for i, (topic, start, size, tenant, requests) in enumerate(batch):
                for p in range(settings.partitions):
                    key, value = rollup(start, requests, tenant=tenant, size=size, partition=p)
                    await producer.send_and_wait(
                        topic,
                        value.model_dump_json().encode(),
                        key=key.encode(),
                        partition=p,
                        timestamp_ms=ts + i,
                    )
    finally:
        await producer.stop()
    per_topic_old = len(old) // 2 * settings.partitions

    everything = await load_view(settings)
    assert everything.records == (len(old) + len(recent)) * settings.partitions

    minutes = await load_view(settings, window="1m")
    assert minutes.records == per_topic_old + 2 * settings.partitions  # no hourly record

    since = now - 2 * HOUR_MS
    hours = await load_view(settings, window="1h", since_ms=since)
    assert hours.records == settings.partitions  # the recent hourly record, none of the old
    recent_minutes = await load_view(settings, window="1m", since_ms=since)
    assert recent_minutes.records == 2 * settings.partitions

    for window in ("1m", "1h", "1d"):
        params = {"window": window, "by": "tenant", "since": since}
        page = await query_rollups(settings, params)
        assert page == everything.query(UsageQuery.parse(params))
        assert [(r["key"]["tenant"], r["totals"]["requests"]) for r in page["rows"]] == [
            ("new", 7 * settings.partitions)  # the last total per key, summed over partitions
        ]
    # and an old range is still answered (records written then are read)
    page = await query_rollups(settings, {"window": "1d", "by": "tenant", "since": old_ts - DAY_MS})
    assert {r["key"]["tenant"] for r in page["rows"]} == {"old0", "old1", "old2", "new"}
