"""Reading the emitted ledger back after an assignment: only the period it is used for.

The ledger remembers which completions were emitted (id -> last source offset) for
``emitted_memory_s``; older entries are of no use, so a newly assigned partition is read
from the first record written within that period up to the partition's end, never from
the beginning of its retention. The start comes from ``offsets_for_times`` where the
broker answers it correctly (Apache Kafka); the answer is checked against the records'
own timestamps, and where it is wrong (the embedded broker answers the first offset) a
bisection over record timestamps finds it: O(log n) single-record fetches.

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

from processor.kafka import POLL_MS, BrokerUnreachable, open_reader, unreachable_message
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
        deadline = _Deadline(stall_s, clock)
        starts = await _start_offsets(consumer, tps, since_ms, deadline)
        for tp in tps:
            consumer.seek(tp, starts[tp])
        return await _read_to_end(
            consumer, tps, fold, wanted, batch_records, deadline, progress_every_s
        )
    except KafkaError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    finally:
        await asyncio.shield(consumer.stop())


class _Deadline:
    """No progress for ``stall_s``: the broker stopped answering. Each probe of the start
    search and the read after it call ``check`` between polls and ``progress`` when they
    learnt something."""

    def __init__(self, stall_s: float, clock: Callable[[], float]) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self.last = clock()

    def progress(self) -> None:
        self.last = self.clock()

    def check(self, what: str) -> None:
        if self.clock() - self.last > self.stall_s:
            raise LedgerStalled(
                f"the broker gave the ledger reader nothing for {self.stall_s:.0f}s while "
                f"{what}; check the broker (the worker restarts and reads again)"
            )


async def _start_offsets(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int, deadline: _Deadline
) -> dict[TopicPartition, int]:
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)  # may be short of the true end (embedded broker)
    # One fetch over every partition from its beginning: its high watermarks are the true
    # ends, and a partition that is empty, or whose first record is already recent enough
    # (the usual case for a young ledger), needs nothing more.
    first = await _first_timestamps(consumer, tps, begin, deadline)
    starts: dict[TopicPartition, int] = {}
    todo = []
    for tp in tps:
        hi = max(end[tp], begin[tp], consumer.highwater(tp) or 0)
        ts = first.get(tp)
        if hi <= begin[tp] or (ts is not None and ts >= since_ms):
            starts[tp] = begin[tp]
        else:
            todo.append((tp, hi))
    if todo:
        answers = await consumer.offsets_for_times({tp: since_ms for tp, _ in todo})
        for tp, hi in todo:
            lo = begin[tp]
            answer = answers.get(tp)
            guess = answer.offset if answer is not None else hi
            if await _is_first_at_or_after(consumer, tp, guess, since_ms, lo, hi, deadline):
                starts[tp] = guess
            else:
                starts[tp] = await _bisect(consumer, tp, since_ms, lo, hi, deadline)
    return starts


async def _first_timestamps(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    begin: dict[TopicPartition, int],
    deadline: _Deadline,
) -> dict[TopicPartition, int]:
    """Timestamp of each partition's first record (absent: empty), in one fetch round."""
    for tp in tps:
        consumer.seek(tp, begin[tp])
    out: dict[TopicPartition, int] = {}
    pending = set(tps)
    deadline.progress()
    while pending:
        batch = await consumer.getmany(*pending, timeout_ms=POLL_MS, max_records=len(tps))
        for tp, recs in batch.items():
            if recs:
                out[tp] = int(recs[0].timestamp)
                pending.discard(tp)
                deadline.progress()
        for tp in list(pending):
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater <= begin[tp]:
                pending.discard(tp)  # empty
                deadline.progress()
        if pending:
            deadline.check(f"looking for the first ledger records of {sorted(pending)}")
    return out


async def _timestamp_at(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, deadline: _Deadline
) -> int | None:
    """Timestamp of the first record at or after ``offset`` (``None``: none there)."""
    consumer.seek(tp, offset)
    deadline.progress()
    while True:
        batch = await consumer.getmany(tp, timeout_ms=POLL_MS, max_records=1)
        for recs in batch.values():
            for rec in recs:
                if rec.offset >= offset:
                    deadline.progress()
                    return int(rec.timestamp)
        highwater = consumer.highwater(tp)
        if highwater is not None and highwater <= offset:
            return None  # nothing at or after it (an empty partition answers at once)
        deadline.check(f"reading the ledger record at {tp.partition}:{offset}")


async def _is_first_at_or_after(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    guess: int,
    since_ms: int,
    lo: int,
    hi: int,
    deadline: _Deadline,
) -> bool:
    """Whether ``guess`` is where records of ``since_ms`` or later begin."""
    if guess < lo or guess > hi:
        return False
    if guess > lo:
        before = await _timestamp_at(consumer, tp, guess - 1, deadline)
        if before is not None and before >= since_ms:
            return False
    if guess < hi:
        at = await _timestamp_at(consumer, tp, guess, deadline)
        if at is not None and at < since_ms:
            return False
    return True


async def _bisect(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    since_ms: int,
    lo: int,
    hi: int,
    deadline: _Deadline,
) -> int:
    """The first offset in ``[lo, hi)`` whose record is at or after ``since_ms``."""
    while lo < hi:
        mid = (lo + hi) // 2
        ts = await _timestamp_at(consumer, tp, mid, deadline)
        if ts is None or ts >= since_ms:
            hi = mid
        else:
            lo = mid + 1
    return lo


async def _read_to_end(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    fold: LedgerFold,
    wanted: Callable[[int], bool],
    batch_records: int,
    deadline: _Deadline,
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
        deadline.check(f"{sorted(tp.partition for tp in remaining)} still had records to read")
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
