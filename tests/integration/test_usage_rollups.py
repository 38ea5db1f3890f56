"""Usage rollups on the real broker: exact under kill -9, served by /usage and the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.helpers.worker import (
    WorkerProcess,
    env_for,
    isolated_settings,
    make_topics,
    produce,
    read_topic,
)
from tests.integration._streams import build_streams, wire


def _usage_of(chunks: list[dict[str, Any]]) -> tuple[int, int]:
    """Prompt and completion tokens of a stream, read straight off its chunks."""
    prompt = completion = 0
    for chunk in chunks:
        usage = chunk.get("usage")
        if usage:
            prompt = usage.get("prompt_tokens", usage.get("promptTokens", prompt)) or prompt
            completion = (
                usage.get("completion_tokens", usage.get("completionTokens", completion))
                or completion
            )
    return prompt, completion


async def _reference_fold(settings: Any) -> Counter[tuple[str, str]]:
    """Requests by (user, feature) of one straight fold of the responses topic, per
    partition in offset order, with the worker's settings (hour rollups + late ones)."""
    from aiokafka import TopicPartition

    from processor.kafka import read_to_end
    from processor.usage import PartitionUsage
    from processor.usage._state import HOUR_MS

    out = Counter[tuple[str, str]]()
    for p in range(settings.partitions):
        tp = TopicPartition(settings.topic_responses, p)
        state = PartitionUsage(
            p,
            int(settings.rollup_late_grace_s * 1000),
            int(settings.usage_dedup_s * 1000),
            int(settings.usage_max_future_s * 1000),
            tp.topic,
            settings.usage_max_users,
            settings.usage_attribute_caps,
            settings.usage_max_attribute_values,
        )
        for rec in await read_to_end(settings, [tp]):
            state.apply(rec.offset, rec.key, rec.value, rec.timestamp)
        for r in state.drain().rollups:
            if r.key.window_ms == HOUR_MS:
                out[(r.key.user, dict(r.key.attributes)["feature"])] += r.totals.requests
    return out


async def test_totals_are_exact_after_kill_9_and_served_everywhere(
    broker: str, tmp_path: Path
) -> None:
    # users and an attribute, with a user cap (3 per partition and hour) that 6 users exceed
    # idle timeout above the restart's pause (4-5 s of record time between the halves):
    # a stream spanning it would otherwise end, correctly, as incomplete without usage
    settings = isolated_settings(
        broker, tmp_path, usage_attributes="feature", usage_max_users=3, idle_timeout_s=12.0
    )
    await make_topics(settings)
    streams = build_streams(120, seed=61, prefix="use")
    records = wire(
        streams, seed=62, labels=lambda i: (f"user-{i % 6}", (("feature", f"f{i % 2}"),))
    )
    half = len(records) // 2
    worker = WorkerProcess(settings, tmp_path / "worker-1.log").start()
    try:
        await produce(settings, records[:half])
        await read_topic(settings, settings.topic_responses, until=10, timeout_s=30)
        await asyncio.sleep(0.5)
    finally:
        worker.kill9()
    restarted = WorkerProcess(settings, tmp_path / "worker-2.log").start()
    try:
        await produce(settings, records[half:])
        await read_topic(settings, settings.topic_responses, until=len(streams), timeout_s=90)
        # The usage agent folds and publishes after the stitcher, and the read model
        # follows the rollup topic: wait until it has counted every completion (or
        # more, which the assertion below then reports), never for a fixed time.
        deadline = time.monotonic() + 60
        while True:
            body = json.loads(restarted.get("/usage?window=1d&by=tenant"))
            counted = sum(row["totals"]["requests"] for row in body["rows"])
            if counted >= len(streams) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        metrics = restarted.get("/metrics").decode()
        by_user = json.loads(restarted.get("/usage?window=1h&by=user,attr.feature"))["rows"]
    finally:
        restarted.stop()
    expected: dict[str, Counter[str]] = {}
    for s in streams:
        prompt, completion = _usage_of(s.chunks)
        c = expected.setdefault(s.tenant, Counter())
        c["requests"] += 1
        c["prompt_tokens"] += prompt
        c["completion_tokens"] += completion
    got = {
        row["key"]["tenant"]: {
            k: row["totals"][k] for k in ("requests", "prompt_tokens", "completion_tokens")
        }
        for row in body["rows"]
    }
    assert got == {t: dict(c) for t, c in expected.items()}
    assert "chunkstitch_tokens_total" in metrics

    # The cap's buckets after kill -9 and recovery are those of one uninterrupted fold of
    # the same responses (deterministic admission), and 'other' holds the rest.
    reference = await _reference_fold(settings)
    live = Counter[tuple[str, str]]()
    for row in by_user:
        live[(row["key"]["user"], row["key"]["attributes"]["feature"])] += row["totals"]["requests"]
    assert live == reference
    assert reference[("other", "f0")] + reference[("other", "f1")] > 0
    assert sum(reference.values()) == len(streams)
    assert 'chunkstitch_usage_capped_total{dimension="user",scope="rollups"}' in metrics

    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor", "usage", "--json", "--window", "1d", "--by", "tenant"],
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    cli = {
        json.loads(line)["key"]["tenant"]: json.loads(line)["totals"]["requests"]
        for line in proc.stdout.splitlines()
    }
    assert cli == {t: c["requests"] for t, c in expected.items()}
    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor", "usage", "--window", "1d", "--by", "tenant"],
        env={**env_for(settings), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert table.returncode == 0, table.stderr
    assert "usage per 1d window" in table.stdout
    for tenant, c in expected.items():
        row = next(line for line in table.stdout.splitlines() if f" {tenant} " in line)
        assert f" {c['requests']} " in row


async def test_late_data_within_grace_updates_its_window_beyond_is_marked(
    broker: str, tmp_path: Path
) -> None:
    import random

    from processor.core import assemble_many, parse_chunk
    from processor.synthetic import make_stream
    from topics import RecordMeta

    settings = isolated_settings(broker, tmp_path, rollup_late_grace_s=60)
    await make_topics(settings)
    now = int(time.time() * 1000) // 60_000 * 60_000  # a window boundary
    absurd = 1_000_000_000_000_000_000_000_000_000_000

    def response(cid: str, started_ms: int) -> bytes:
        chunks = make_stream("openai-text", cid, random.Random(1)).chunks
        resp = assemble_many(parse_chunk(c) for c in chunks)[0]
        meta = resp.chunkstitch.model_copy(
            update={"tenant": "acme", "request_started_at_ms": started_ms}
        )
        return resp.model_copy(update={"chunkstitch": meta}).to_json()

    records = [
        (b"r-now", response("r-now", now + 5_000), RecordMeta()),  # stream time: now + 5 s
        (
            b"r-grace",
            response("r-grace", now - 30_000),
            RecordMeta(),
        ),  # window ended at now: within 60 s
        (b"r-late", response("r-late", now - 600_000), RecordMeta()),  # ended 9 min ago: beyond
        # an absurd request time (issue 12): counted as late, never moves stream time
        (b"r-absurd", response("r-absurd", absurd), RecordMeta()),
        (b"r-after", response("r-after", now + 6_000), RecordMeta()),  # still on time
    ]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        for record in records:  # one partition, in this order: stream time is per partition
            await produce(settings, [record], topic=settings.topic_responses, partition=0)
        rows: list[dict[str, Any]] = []
        for _ in range(40):
            rows = json.loads(worker.get("/usage?window=1m&by=tenant"))["rows"]
            if sum(r["totals"]["requests"] for r in rows) == 5:
                break
            await asyncio.sleep(0.25)
    finally:
        worker.stop()
    for window in ("1m", "1d"):
        table = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "processor", "usage", "--window", window, "--by", "tenant"],
            env={**env_for(settings), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert table.returncode == 0, table.stderr
        assert "late" in table.stdout
    windows = {
        (r["key"]["window_start_ms"], r["key"]["late"]): r["totals"]["requests"] for r in rows
    }
    assert windows == {
        (now, False): 2,
        (now - 60_000, False): 1,
        (now - 600_000, True): 1,
        (absurd // 60_000 * 60_000, True): 1,
    }
