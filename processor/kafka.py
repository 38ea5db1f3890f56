"""Small aiokafka helpers shared by the admin command, the worker and the clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from processor.settings import Settings

__all__ = ["BrokerUnreachable", "read_to_end", "unreachable_message"]


class BrokerUnreachable(RuntimeError):
    """The broker did not answer; the message says which address and which setting."""


def unreachable_message(settings: Settings, exc: BaseException | None = None) -> str:
    detail = f" ({exc})" if exc else ""
    return (
        f"cannot reach the Kafka broker at {settings.broker}{detail}. "
        "Start one (`chunkstitch broker` runs the embedded broker on 127.0.0.1:9092) or "
        "point CHUNKSTITCH_BROKER at yours (host:port)."
    )


async def read_to_end(
    settings: Settings,
    tps: Iterable[TopicPartition],
    *,
    timeout_s: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the given partitions, from the beginning to the current end.

    The end is the high watermark that the broker returns in *fetch* responses: the
    embedded broker (Tansu) answers ListOffsets(latest) with the start of the last batch
    plus one, so ``end_offsets()`` would stop early there. This is the one place that
    knows; on Apache Kafka both agree.
    """
    parts = list(tps)
    if not parts:
        return []
    consumer: AIOKafkaConsumer = AIOKafkaConsumer(
        **settings.kafka_kwargs(),
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # reading to a known end: never wait for new records
    )
    try:
        await consumer.start()
    except KafkaConnectionError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        remaining = set(parts)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {sorted(str(tp) for tp in remaining)} to its end took longer "
                    f"than {timeout_s:.0f}s; is the broker at {settings.broker} overloaded?"
                )
            batch: dict[Any, list[ConsumerRecord[bytes, bytes]]] = await consumer.getmany(
                *remaining, timeout_ms=200
            )
            for records in batch.values():
                out.extend(records)
            for tp in list(remaining):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    remaining.discard(tp)
    except KafkaError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    finally:
        await asyncio.shield(consumer.stop())
    return out
