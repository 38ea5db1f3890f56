"""Where the records of a time begin, on any Kafka-protocol broker; no-progress deadlines.

A reader that needs only a recent period of a partition (the emitted ledger after an
assignment, the usage view after a restart, ``chunkstitch usage --since``) starts at the
first record whose timestamp is at or after a time. ``offsets_for_times`` answers that on
Apache Kafka; the embedded broker answers the partition's first offset instead. So the
answer is checked against the records' own timestamps (two single-record fetches) and,
where it is wrong, a bisection over record timestamps finds the offset: O(log n)
single-record fetches, never a read of the partition. Record timestamps are taken to
rise with the offset (one producer's clock, or log-append time); where a few do not, the
start found is one at which the timestamps cross the time, which the callers' margins
cover.

:class:`Deadline` is the one no-progress rule of these reads: they give up only when
the broker returned nothing for ``stall_s`` while something remained, never after a
fixed time that the data could outgrow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

__all__ = ["POLL_MS", "Deadline", "offsets_at"]

POLL_MS = 20
"""How long one ``getmany`` of a read to a known end waits. aiokafka's ``getmany``
returns when records arrive or its timeout expires, not when an empty fetch response
comes back, so a partition with nothing (more) to read (an empty one, or one whose
checkpoint is at its end: every restart) would cost the whole timeout; the readers poll
at this interval instead and decide by the fetch's high watermark. Their stall timeouts
are separate and measured in time without progress."""


class Deadline:
    """No progress for ``stall_s``: the broker stopped answering. A read calls
    :meth:`check` between polls (it raises ``stalled(what)``) and :meth:`progress`
    whenever it learnt something."""

    def __init__(
        self,
        stall_s: float,
        stalled: Callable[[str], Exception],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_s = stall_s
        self.stalled = stalled
        self.clock = clock
        self.last = clock()

    def progress(self) -> None:
        self.last = self.clock()

    def check(self, what: str) -> None:
        if self.clock() - self.last > self.stall_s:
            raise self.stalled(what)


async def offsets_at(
    consumer: AIOKafkaConsumer,
    since: Mapping[TopicPartition, int],
    deadline: Deadline,
) -> dict[TopicPartition, int]:
    """For each assigned partition, the first offset whose record's timestamp is at or
    after ``since[tp]`` (epoch ms); the partition's end where there is none (records
    written after the end was asked for are then read, never skipped). Leaves the
    consumer's positions anywhere: the caller seeks."""
    tps = list(since)
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)  # may be short of the true end (embedded broker)
    # One fetch over every partition from its beginning: its high watermarks are the true
    # ends, and a partition that is empty, or whose first record is already recent enough
    # (the usual case for a young topic), needs nothing more.
    first = await _first_timestamps(consumer, tps, begin, deadline)
    starts: dict[TopicPartition, int] = {}
    todo = []
    for tp in tps:
        hi = max(end[tp], begin[tp], consumer.highwater(tp) or 0)
        ts = first.get(tp)
        if hi <= begin[tp] or (ts is not None and ts >= since[tp]):
            starts[tp] = begin[tp]
        else:
            todo.append((tp, hi))
    if todo:
        answers = await consumer.offsets_for_times({tp: since[tp] for tp, _ in todo})
        for tp, hi in todo:
            lo = begin[tp]
            answer = answers.get(tp)
            guess = answer.offset if answer is not None else hi
            if await _is_first_at_or_after(consumer, tp, guess, since[tp], lo, hi, deadline):
                starts[tp] = guess
            else:
                starts[tp] = await _bisect(consumer, tp, since[tp], lo, hi, deadline)
    return starts


async def _first_timestamps(
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    begin: dict[TopicPartition, int],
    deadline: Deadline,
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
            deadline.check(f"looking for the first records of {_names(pending)}")
    return out


async def _timestamp_at(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, deadline: Deadline
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
        deadline.check(f"reading the record at {tp.topic}:{tp.partition}:{offset}")


async def _is_first_at_or_after(
    consumer: AIOKafkaConsumer,
    tp: TopicPartition,
    guess: int,
    since_ms: int,
    lo: int,
    hi: int,
    deadline: Deadline,
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
    deadline: Deadline,
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


def _names(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}:{tp.partition}" for tp in sorted(tps))
