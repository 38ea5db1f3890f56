"""Reading the emitted ledger back after an assignment: only the period it is used for.

The ledger remembers which completions were emitted (id -> last source offset) for
``emitted_memory_s``; older entries are of no use, so a newly assigned partition is read
from the first record written within that period up to the partition's end, never from
the beginning of its retention. The start is found by :func:`processor._seek.offsets_at`
(``offsets_for_times``, checked against the records' own timestamps, and a bisection
over them where the broker answers wrong: O(log n) single-record fetches).

The end is the high watermark of fetch responses (see :mod:`processor.kafka`). No fixed
timeout: the read gives up only when the broker returns nothing for ``stall_s`` while
records remain, and it logs its progress every few seconds on long reads.

The records are handed to a ``fold`` callback batch by batch (at most ``batch_records``
decoded at a time), each partition's in offset order, and not kept: memory is one fetch's
raw bytes plus one batch plus whatever the caller folds them into (an hour of ledger at
gateway volume is millions of records). A partition the caller no
longer ``wants`` (revoked meanwhile) is paused and its records are no longer handed over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from processor._seek import POLL_MS, Deadline, offsets_at
from processor.kafka import BrokerUnreachable, open_reader, unreachable_message
from processor.logs import get_logger
from processor.settings import Settings

__all__ = ["LedgerFold", "LedgerStalled", "read_ledger"]

log = get_logger("chunkstitch.worker")

Records = list[ConsumerRecord[bytes, bytes]]

LedgerFold = Callable[[int, Records], None]
"""``fold(partition, records)``: one fetched batch of a partition, in offset order."""


class LedgerStalled(RuntimeError):
    """The broker stopped returning ledger records while some remained."""


async def read_ledger(
    settings: Settings,
    partitions: Sequence[int],
    since_ms: int,
    fold: LedgerFold,
    *,
    wanted: Callable[[int], bool] = lambda partition: True,
    batch_records: int = 10_000,
    stall_s: float = 60.0,
    progress_every_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Hand the ledger records of ``partitions`` written at or after ``since_ms`` (epoch
    ms) to ``fold``, at most ``batch_records`` at a time; returns how many were handed
    over. A partition for which ``wanted(partition)`` turns false is no longer read."""
    if not partitions:
        return 0
    tps = [TopicPartition(settings.topic_ledger, p) for p in partitions]
    consumer = await open_reader(
        settings,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # reading to a known end: never wait for new records
    )
    try:
        consumer.assign(tps)
        deadline = stall_deadline(stall_s, clock)
        starts = await offsets_at(consumer, dict.fromkeys(tps, since_ms), deadline)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        return await _read_to_end(
            consumer, tps, fold, wanted, batch_records, deadline, progress_every_s
        )
    except KafkaError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    finally:
        await asyncio.shield(consumer.stop())


def stall_deadline(stall_s: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
    """The ledger reader's no-progress rule (:class:`LedgerStalled` after ``stall_s``)."""

    def stalled(what: str) -> LedgerStalled:
        return LedgerStalled(
            f"the broker gave the ledger reader nothing for {stall_s:.0f}s while {what}; "
            "check the broker (the worker restarts and reads again)"
        )

    return Deadline(stall_s, stalled, clock)


async def _read_to_end(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    fold: LedgerFold,
    wanted: Callable[[int], bool],
    batch_records: int,
    deadline: Deadline,
    progress_every_s: float,
) -> int:
    remaining = set(tps)
    deadline.progress()
    started = last_log = deadline.clock()
    total = 0
    while remaining:
        # Before each poll, so that partitions the start search already saw to their end
        # (empty, or nothing since the start) cost none, and so that a partition whose end
        # the last poll revealed finishes before the stall check.
        for tp in list(remaining):
            highwater = consumer.highwater(tp)
            if highwater is not None and await consumer.position(tp) >= highwater:
                remaining.discard(tp)
        dropped = [tp for tp in remaining if not wanted(tp.partition)]
        if dropped:
            consumer.pause(*dropped)  # revoked meanwhile: no more fetches for it
            remaining.difference_update(dropped)
        if not remaining:
            break
        deadline.check(
            f"ledger partitions {sorted(tp.partition for tp in remaining)} still had records"
        )
        now = deadline.clock()
        if now - last_log >= progress_every_s:
            last_log = now
            log.info(
                "reading the ledger",
                records=total,
                seconds=round(now - started, 1),
                partitions=sorted(tp.partition for tp in remaining),
            )
        # At most batch_records decoded at a time: the rest of a fetch waits in the
        # consumer as raw bytes (the embedded broker may answer a whole partition at once).
        batch: dict[Any, Records] = await consumer.getmany(
            *remaining, timeout_ms=POLL_MS, max_records=batch_records
        )
        for tp, records in batch.items():
            if records and tp in remaining and wanted(tp.partition):
                fold(tp.partition, records)
                total += len(records)
                deadline.progress()
    return total
