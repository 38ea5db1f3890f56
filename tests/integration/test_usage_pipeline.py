"""The whole usage path on real processes: chunks -> worker (estimated cost in the response
metadata, the rollups, /usage and Prometheus) -> rollup topic -> usage sink -> PostgreSQL,
where the database answers exactly what the worker's /usage answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from processor.core import result
from processor.pricing import PRICE_DATA
from processor.usage._pg import query_usage, row_of, upsert
from tests.helpers.postgres import fresh_database, server_dsn
from tests.helpers.rollups import aggregate, read_rollups
from tests.helpers.worker import (
    WorkerProcess,
    env_for,
    isolated_settings,
    make_topics,
    produce,
    read_topic,
)
from tests.integration._streams import build_streams, wire
from tests.integration.test_usage_sink import SinkProcess
from topics import ChatCompletion, UsageKey, UsageTotals


@pytest.fixture
async def db() -> AsyncIterator[str]:
    async with fresh_database(server_dsn()) as dsn:
        yield dsn


async def test_estimated_cost_flows_to_usage_metrics_and_the_database(
    broker: str, tmp_path: Path, db: str
) -> None:
    settings = isolated_settings(broker, tmp_path, usage_dsn=db)
    await make_topics(settings)
    streams = build_streams(40, seed=71, prefix="cost")
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    sink = SinkProcess(settings, db, tmp_path / "sink.log").start()
    try:
        await produce(settings, wire(streams, seed=72))
        records = await read_topic(settings, settings.topic_responses, until=len(streams))
        responses = [ChatCompletion.model_validate_json(v) for _, v in records]
        assert len({r.id for r in responses}) == len(streams)
        by_model = {}
        for r in responses:
            meta = r.chunkstitch
            assert meta.cost_reported is None or meta.cost_estimated is None  # never both
            by_model.setdefault((r.model, meta.provider), set()).add(
                (meta.cost_reported is not None, meta.cost_estimated is not None)
            )
            if meta.cost_estimated is not None:
                assert meta.price_data == PRICE_DATA
        estimated = [r for r in responses if r.chunkstitch.cost_estimated is not None]
        reported = [r for r in responses if r.chunkstitch.cost_reported is not None]
        unpriced = [
            r
            for r in responses
            if r.usage is not None
            and r.chunkstitch.usage_reported
            and r.chunkstitch.cost_estimated is None
            and r.chunkstitch.cost_reported is None
        ]
        assert estimated, by_model
        assert reported, by_model  # OpenRouter reports its own cost
        assert unpriced, by_model  # self-hosted vLLM: no estimate, never a guess
        expected_est = sum(r.chunkstitch.cost_estimated or 0 for r in responses)

        by = ["tenant", "model", "provider"]
        live: list[dict[str, object]] = []
        for _ in range(60):  # the Kafka side: the rollup topic, aggregated
            live = json.loads(
                json.dumps(aggregate(await read_rollups(settings), window="1d", by=by))
            )
            if sum(int(r["totals"]["requests"]) for r in live) == len(streams):  # type: ignore[index]
                break
            await asyncio.sleep(0.25)
        total_est = sum(r["cost_estimated_usd"] for r in live)  # type: ignore[misc]
        assert total_est == pytest.approx(expected_est, rel=1e-6)
        # (Prometheus: tests/unit/test_pricing.py; the worker on main skips the token and cost
        # counters for completions folded by its rebuild, which the bounded-state work fixes)

        conn = await asyncpg.connect(db)
        try:
            from_db: list[dict[str, object]] = []
            for _ in range(80):
                try:
                    answer = await query_usage(conn, "1d", by)
                    from_db = json.loads(json.dumps(answer))  # as /usage sends it
                except asyncpg.UndefinedTableError:
                    from_db = []
                if from_db == live:
                    break
                await asyncio.sleep(0.25)
            assert from_db == live
        finally:
            await conn.close()

        # The worker has a DSN: a range beyond the live retention (here: no start) is
        # answered by the database, a recent one live; both in the same shape.
        body = json.loads(worker.get("/usage?window=1d&by=tenant,model,provider"))
        assert body["rows"] == live
        assert body["price_data"] == PRICE_DATA
        marker = result(
            UsageKey(
                window_start_ms=0,
                window_ms=60_000,
                tenant="only-in-db",
                model="m",
                provider="p",
                status="complete",
            ),
            UsageTotals(requests=1),
            0,
        )
        conn = await asyncpg.connect(db)
        try:
            await upsert(conn, [row_of(marker, 0, 0)])
        finally:
            await conn.close()
        tenants = {r["key"]["tenant"] for r in json.loads(worker.get("/usage?window=1d"))["rows"]}
        assert "only-in-db" in tenants  # so the answer above came from the database
        recent = int(time.time() * 1000) - 3_600_000
        assert json.loads(worker.get(f"/usage?window=1d&since={recent}"))["rows"] == []
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "processor",
                "usage",
                "--json",
                "--window",
                "1d",
                "--by",
                "tenant,model,provider",
                "--dsn",
                db,
            ],
            env={**env_for(settings), "CHUNKSTITCH_USAGE_DSN": ""},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        cli = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r for r in cli if r["key"]["tenant"] != "only-in-db"] == live
        assert any(r["key"]["tenant"] == "only-in-db" for r in cli)  # from the database
    finally:
        sink.stop()
        worker.stop()
