"""The whole usage path on real processes: chunks -> worker (estimated cost in the response
metadata, the rollups, /usage and Prometheus) -> rollup topic -> usage sink -> PostgreSQL,
where the database answers exactly what the worker's /usage answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from processor.pricing import PRICE_DATA
from processor.usage._pg import query_usage
from tests.helpers.postgres import fresh_database, server_dsn
from tests.helpers.worker import WorkerProcess, isolated_settings, make_topics, produce, read_topic
from tests.integration._streams import build_streams, wire
from tests.integration.test_usage_sink import SinkProcess
from topics import ChatCompletion


@pytest.fixture
async def db() -> AsyncIterator[str]:
    async with fresh_database(server_dsn()) as dsn:
        yield dsn


async def test_estimated_cost_flows_to_usage_metrics_and_the_database(
    broker: str, tmp_path: Path, db: str
) -> None:
    settings = isolated_settings(broker, tmp_path)
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

        query = "/usage?window=1d&by=tenant,model,provider"
        rows: list[dict[str, object]] = []
        for _ in range(60):
            rows = json.loads(worker.get(query))["rows"]
            if sum(int(r["totals"]["requests"]) for r in rows) == len(streams):  # type: ignore[index]
                break
            await asyncio.sleep(0.25)
        total_est = sum(r["cost_estimated_usd"] for r in rows)  # type: ignore[misc]
        assert total_est == pytest.approx(expected_est, rel=1e-6)
        # (Prometheus: tests/unit/test_pricing.py; the worker on main skips the token and cost
        # counters for completions folded by its rebuild, which the bounded-state work fixes)

        conn = await asyncpg.connect(db)
        try:
            from_db: list[dict[str, object]] = []
            for _ in range(80):
                try:
                    answer = await query_usage(conn, "1d", ["tenant", "model", "provider"])
                    from_db = json.loads(json.dumps(answer))  # as /usage sends it
                except asyncpg.UndefinedTableError:
                    from_db = []
                if from_db == rows:
                    break
                await asyncio.sleep(0.25)
            assert from_db == rows
        finally:
            await conn.close()
    finally:
        sink.stop()
        worker.stop()
