"""The usage plug-in of the worker: an agent on the responses topic, rollup publishing,
token metrics, and ``GET /usage``."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import faust
from faust.web import Request, Response, View

from processor import metrics
from processor.core import result
from processor.kafka import read_to_end
from processor.logs import get_logger
from processor.pricing import PRICE_DATA
from processor.settings import Settings
from processor.usage._history import History
from processor.usage._read import DIMENSIONS, aggregate, read_rollups
from processor.usage._state import PartitionUsage
from processor.web_auth import check_bearer
from topics import ChatCompletion

__all__ = ["register"]

log = get_logger("chunkstitch.usage")


def register(app: faust.App, settings: Settings) -> None:
    """Add the usage agent, its publishing timer and ``/usage`` to the worker app."""
    responses = app.topic(
        settings.topic_responses,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        internal=False,
    )
    grace_ms = int(settings.rollup_late_grace_s * 1000)
    parts: dict[int, PartitionUsage] = {}
    loading: dict[int, asyncio.Task[PartitionUsage]] = {}
    lock = asyncio.Lock()

    async def rebuild(partition: int) -> PartitionUsage:
        from aiokafka import TopicPartition

        state = PartitionUsage(partition, grace_ms)
        records = await read_to_end(settings, [TopicPartition(settings.topic_responses, partition)])
        for rec in records:
            state.apply(rec.offset, rec.key, rec.value)
        state.changed = set(state.buckets)  # publish everything once after a rebuild
        log.info("usage rebuilt", partition=partition, completions=len(state.counted))
        return state

    async def partition_state(partition: int) -> PartitionUsage:
        state = parts.get(partition)
        if state is None:
            task = loading.get(partition)
            if task is None:
                task = loading[partition] = asyncio.ensure_future(rebuild(partition))
            try:
                state = parts[partition] = await task
            finally:
                loading.pop(partition, None)
        return state

    @app.agent(responses, concurrency=1)
    async def count_usage(stream: faust.StreamT[bytes]) -> None:
        async for events in cast(Any, stream).take_events(500, 0.05):
            async with lock:
                for event in events:
                    message = event.message
                    state = await partition_state(message.partition)
                    late_before = state.late
                    response = state.apply(message.offset, message.key, message.value)
                    if response is not None:
                        _count_tokens(response, settings.metrics_label_cap)
                        if state.late != late_before:
                            log.warning(
                                "late completion counted in a late bucket",
                                completion_id=response.id,
                                partition=message.partition,
                                offset=message.offset,
                                grace_s=settings.rollup_late_grace_s,
                            )
            await publish()

    async def publish() -> None:
        pending = []
        for state in list(parts.values()):
            for bucket in list(state.changed):
                record = result(bucket, state.buckets[bucket], state.partition)
                pending.append(
                    await app.producer.send(
                        settings.topic_rollups,
                        bucket.record_key(state.partition).encode(),
                        record.model_dump_json().encode(),
                        None,
                        None,
                        None,
                    )
                )
            state.changed.clear()
        if pending:
            await asyncio.gather(*pending)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type,unused-ignore]
    async def on_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        for tp in revoked:
            if tp.topic == settings.topic_responses:
                parts.pop(tp.partition, None)

    history = History(settings)

    @app.page("/usage")
    class Usage(View):
        async def get(self, request: Request) -> Response:
            denied = check_bearer(request.headers.get("Authorization"), settings.api_token)
            if denied is not None:
                return self.json(denied.body, status=denied.status, headers=denied.headers)
            query = request.query
            by = [d for d in query.get("by", ",".join(DIMENSIONS)).split(",") if d]
            try:
                params: dict[str, Any] = {
                    "window": query.get("window", "1m"),
                    "by": by,
                    "since_ms": int(query["since"]) if "since" in query else None,
                    "until_ms": int(query["until"]) if "until" in query else None,
                    "filters": {d: query.get(d, "") for d in DIMENSIONS},
                }
                rows = await history.answer(**params)  # beyond the live retention: PostgreSQL
                if rows is None:
                    rows = aggregate(await read_rollups(settings), **params)
            except ValueError as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json({"rows": rows, "price_data": PRICE_DATA})  # behind estimates


_seen_labels: set[tuple[str, str, str]] = set()


def _count_tokens(response: ChatCompletion, cap: int) -> None:
    usage = response.usage
    if usage is None:
        return
    labels = (
        response.chunkstitch.tenant or "unknown",
        response.model or "unknown",
        response.chunkstitch.provider or "unknown",
    )
    if labels not in _seen_labels:
        if len(_seen_labels) >= cap:
            labels = ("other", "other", "other")
        else:
            _seen_labels.add(labels)
    metrics.TOKENS.labels(*labels, "prompt").inc(usage.prompt_tokens)
    metrics.TOKENS.labels(*labels, "completion").inc(usage.completion_tokens)
    if response.chunkstitch.cost_reported is not None:
        metrics.COST.labels(*labels, "reported").inc(response.chunkstitch.cost_reported)
    if response.chunkstitch.cost_estimated is not None:
        metrics.COST.labels(*labels, "estimated").inc(response.chunkstitch.cost_estimated)
    meta = response.chunkstitch
    if meta.time_to_first_chunk_ms is not None:
        metrics.TTFC.observe(meta.time_to_first_chunk_ms / 1000)
    if meta.duration_ms is not None:
        metrics.DURATION.observe(meta.duration_ms / 1000)
