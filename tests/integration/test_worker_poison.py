"""Poison input on the real broker: the worker keeps running and every stream comes out.

* Non-finite and out-of-range numbers waiting behind a sequence gap (before: the timer
  drained them into ``int(inf)`` and the worker crash-looped on every replay).
* An absurd ``cs-started-at`` (before: it became the partition's stream time, every later
  completion was counted late, and ``chunkstitch usage --window 1d`` crashed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
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
from tests.integration._streams import build_streams, comparable, expected, wire
from topics import RecordMeta


def _chunk(cid: str, choice: str = '{"index": 0, "delta": {"content": "a"}}', **top: str) -> bytes:
    fields = "".join(f', "{k}": {v}' for k, v in top.items())
    return f'{{"id": "{cid}", "choices": [{choice}]{fields}}}'.encode()


# Streams whose chunk 1 never arrives, so that the poison after it waits in the assembler
# until the idle timeout drains it (the crash of issue 12).
POISON: dict[str, list[tuple[int | None, bytes]]] = {
    "poison-index": [
        (0, _chunk("poison-index")),
        (2, _chunk("poison-index", '{"index": 1e999, "delta": {"content": "x"}}')),
        (3, _chunk("poison-index", '{"index": NaN, "delta": {}, "finish_reason": "stop"}')),
    ],
    "poison-created": [
        (0, _chunk("poison-created")),
        (2, _chunk("poison-created", created="Infinity")),
    ],
    "poison-usage": [
        (0, _chunk("poison-usage")),
        (2, _chunk("poison-usage", usage='{"prompt_tokens": -5, "total_tokens": 1e999}')),
        (3, _chunk("poison-usage", '{"index": 1000000000000000000000000000000, "delta": {}}')),
    ],
}
POISON_FIELDS = {
    "choices[0].index": 3,
    "created": 1,
    "usage.prompt_tokens": 1,
}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_poison_numbers_behind_a_gap_never_crash_the_worker(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path, idle_timeout_s=3.0)
    await make_topics(settings)
    good = build_streams(12, seed=71, prefix="ok")
    poison = [
        (cid.encode(), value, RecordMeta(seq=seq, tenant="acme"))
        for cid, chunks in POISON.items()
        for seq, value in chunks
    ]
    markers = [
        (cid.encode(), b"", RecordMeta(end_count=len(chunks) + 1, end_reason="done"))
        for cid, chunks in POISON.items()
    ]
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        assert worker.proc is not None
        pid = worker.proc.pid
        await produce(settings, poison + wire(good, seed=72) + markers)
        got = await read_topic(
            settings, settings.topic_responses, until=len(good) + len(POISON), timeout_s=60
        )
        # Past another idle timeout and several timer rounds: a crash would have happened.
        await asyncio.sleep(settings.idle_timeout_s + 2)
        assert worker.proc.poll() is None, f"the worker exited; see {worker.log_path}"
        assert worker.proc.pid == pid
        # Traffic after the poison still flows.
        late = build_streams(3, seed=73, prefix="after")
        await produce(settings, wire(late, seed=74))
        got = await read_topic(
            settings,
            settings.topic_responses,
            until=len(good) + len(POISON) + len(late),
            timeout_s=60,
        )
        letters = await read_topic(
            settings,
            settings.topic_deadletter,
            until=sum(POISON_FIELDS.values()),
            timeout_s=30,
            distinct_keys=False,
        )
        metrics = worker.get("/metrics").decode()
        assert worker.proc.poll() is None
    finally:
        worker.stop()

    by_id: dict[str, dict[str, Any]] = {}
    for key, value in got:
        assert key is not None
        by_id[key.decode()] = json.loads(value)
    for s in good + late:
        assert comparable(by_id[s.completion_id]) == expected(s), s.completion_id
    for cid in POISON:
        meta = by_id[cid]["chunkstitch"]
        assert meta["status"] == "incomplete", (cid, meta)
        assert "idle timeout" in meta["reason"], meta
        assert by_id[cid]["choices"][0]["message"]["content"] == "a"  # only the good chunk

    fields: dict[str, int] = {}
    raw = {value for chunks in POISON.values() for _, value in chunks}
    for key, value in letters:
        letter = json.loads(value)
        assert letter["reason"] == "wrong_type", letter
        assert key is not None
        assert key.decode() in POISON
        assert base64.b64decode(letter["value_b64"]) in raw  # the original bytes, to replay
        field = letter["message"].split("'")[1]
        fields[field] = fields.get(field, 0) + 1
    assert fields == POISON_FIELDS
    assert _metric(metrics, 'chunkstitch_dead_letters_total{reason="wrong_type"}') == 5
    assert _metric(metrics, 'chunkstitch_dead_letters_total{reason="internal_error"}') == 0


async def test_an_absurd_started_at_skews_no_usage_and_the_usage_cli_works(
    broker: str, tmp_path: Path
) -> None:
    # One partition: every completion shares the usage fold's stream time.
    settings = isolated_settings(broker, tmp_path, partitions=1)
    await make_topics(settings)
    absurd, *normal = build_streams(6, seed=81, prefix="started")

    def records(stream: Any, started_ms: int) -> list[tuple[bytes, bytes, RecordMeta]]:
        key = stream.completion_id.encode()
        out = [
            (
                key,
                json.dumps(c).encode(),
                RecordMeta(seq=i, tenant="acme", started_at_ms=started_ms),
            )
            for i, c in enumerate(stream.chunks)
        ]
        return [*out, (key, b"", RecordMeta(end_count=len(out), end_reason="done"))]

    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        # First the absurd one (it would become the stream time), then the normal ones.
        await produce(settings, records(absurd, 10**30))
        await read_topic(settings, settings.topic_responses, until=1, timeout_s=30)
        now_ms = int(time.time() * 1000)
        await produce(settings, [r for s in normal for r in records(s, now_ms - 500)])
        got = await read_topic(settings, settings.topic_responses, until=6, timeout_s=60)
        rows: list[dict[str, Any]] = []
        for _ in range(60):
            rows = json.loads(worker.get("/usage?window=1m&by=tenant"))["rows"]
            if sum(r["totals"]["requests"] for r in rows) == 6:
                break
            await asyncio.sleep(0.25)
        metrics = worker.get("/metrics").decode()
        cli_json, cli_table = await asyncio.gather(
            *(
                asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "processor", "usage", "--window", "1d", *extra],
                    env={**env_for(settings), "COLUMNS": "200"},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                for extra in (["--json", "--by", "tenant"], [])
            )
        )
        assert worker.proc is not None
        assert worker.proc.poll() is None
    finally:
        worker.stop()

    bodies = {json.loads(v)["id"]: json.loads(v)["chunkstitch"] for _, v in got}
    assert "request_started_at_ms" not in bodies[absurd.completion_id]
    assert bodies[absurd.completion_id]["first_chunk_at_ms"] >= now_ms - 120_000
    for s in normal:
        assert bodies[s.completion_id]["request_started_at_ms"] == now_ms - 500
    assert sum(r["totals"]["requests"] for r in rows) == 6
    assert [r["key"] for r in rows if r["key"]["late"]] == []  # no late skew
    assert _metric(metrics, 'chunkstitch_headers_ignored_total{header="cs-started-at"}') == len(
        absurd.chunks
    )
    assert cli_json.returncode == 0, cli_json.stderr
    cli_rows = [json.loads(line) for line in cli_json.stdout.splitlines()]
    assert {r["key"]["tenant"] for r in cli_rows} == {"acme"}
    assert sum(r["totals"]["requests"] for r in cli_rows) == 6
    assert not any(r["key"].get("late") for r in cli_rows)
    assert cli_table.returncode == 0, cli_table.stderr
    assert "usage per 1d window" in cli_table.stdout
