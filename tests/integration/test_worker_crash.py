"""Crash safety on the real embedded broker: kill -9 and restart, and a group of two
workers losing one. Every completion must arrive with exactly the right content; a
completion may arrive twice only as an identical record."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.helpers.worker import (
    WorkerProcess,
    isolated_settings,
    make_topics,
    produce,
    read_quiet,
    read_topic,
)
from tests.integration._streams import build_streams, comparable, expected, wire


def _check_all(got: list[tuple[bytes | None, bytes]], streams: list) -> int:  # type: ignore[type-arg]
    seen: dict[bytes, bytes] = {}
    duplicates = 0
    for key, value in got:
        assert key is not None
        if key in seen:
            duplicates += 1
            assert seen[key] == value, f"{key!r} emitted twice with different content"
        seen[key] = value
    missing = {s.completion_id for s in streams} - {k.decode() for k in seen}
    assert not missing, f"{len(missing)} completions never arrived, e.g. {sorted(missing)[:3]}"
    for s in streams:
        assert comparable(json.loads(seen[s.completion_id.encode()])) == expected(s), (
            s.completion_id
        )
    return duplicates


async def test_kill_9_mid_run_then_restart_loses_and_corrupts_nothing(
    broker: str, tmp_path: Path
) -> None:
    # The last third is published once the restarted worker is ready, 4-5 s after the
    # second: a stream with chunks on both sides of that pause really was idle that long
    # in its record times, and a 4 s idle timeout then ends it as incomplete (correctly).
    # The timeout here is above the pause: this test is about the crash, not idleness.
    settings = isolated_settings(broker, tmp_path, idle_timeout_s=12.0)
    await make_topics(settings)
    streams = build_streams(240, seed=21, prefix="crash")
    records = wire(streams, seed=22)
    third = len(records) // 3
    worker = WorkerProcess(settings, tmp_path / "worker-1.log").start()
    try:
        await produce(settings, records[:third])
        # wait until the worker is in the middle of it: some completions out, many open
        await read_topic(settings, settings.topic_responses, until=20, timeout_s=30)
        await produce(settings, records[third : 2 * third])
        await asyncio.sleep(0.3)
    finally:
        worker.kill9()
    restarted = WorkerProcess(settings, tmp_path / "worker-2.log").start()
    try:
        await produce(settings, records[2 * third :])
        await read_topic(settings, settings.topic_responses, until=len(streams), timeout_s=90)
        # Let every timer fire (idle timeout) before judging: a replayed fragment of an
        # emitted completion would surface only then.
        await asyncio.sleep(settings.idle_timeout_s + 1)
        got = await read_quiet(settings, settings.topic_responses)
    finally:
        restarted.stop()
    _check_all(got, streams)


async def test_two_workers_split_partitions_one_killed_other_takes_over(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path)
    await make_topics(settings)
    streams = build_streams(160, seed=31, prefix="pair")
    records = wire(streams, seed=32)
    half = len(records) // 2
    first = WorkerProcess(settings, tmp_path / "worker-a.log").start()
    second = WorkerProcess(settings, tmp_path / "worker-b.log").start()
    try:
        await asyncio.sleep(settings.session_timeout_s)  # let the group settle on two members
        parts_a = json.loads(first.get("/readyz"))["partitions"]
        parts_b = json.loads(second.get("/readyz"))["partitions"]
        assert parts_a, parts_a
        assert parts_b, parts_b
        assert not set(parts_a) & set(parts_b)
        await produce(settings, records[:half])
        await read_topic(settings, settings.topic_responses, until=10, timeout_s=30)
        first.kill9()
        await produce(settings, records[half:])
        await read_topic(settings, settings.topic_responses, until=len(streams), timeout_s=90)
        await asyncio.sleep(settings.idle_timeout_s + 1)
        got = await read_quiet(settings, settings.topic_responses)
        assert sorted(json.loads(second.get("/readyz"))["partitions"]) == list(
            range(settings.partitions)
        )
    finally:
        first.stop()
        second.stop()
    _check_all(got, streams)
