"""The start search (``processor._seek``) and the ledger read without a broker: a slow
broker is waited for (no count of polls it could outgrow), a silent one stops the read
loudly after ``stall_s``; a wrong ``offsets_for_times`` answer is corrected."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition

from processor._seek import _first_timestamps, _timestamp_at, offsets_at
from processor.worker._ledger import LedgerStalled, _read_to_end, stall_deadline

TP0 = TopicPartition("ledger", 0)
TP1 = TopicPartition("ledger", 1)


@dataclass(frozen=True)
class Answer:
    offset: int


@dataclass(frozen=True)
class Rec:
    offset: int
    timestamp: int


class SlowConsumer:
    """Answers nothing for ``silent_polls`` polls after each seek, then the records from
    the position sought (``None`` polls: never answers). Each poll advances a fake clock
    by its timeout, as a real ``getmany`` that returns empty-handed does."""

    def __init__(self, logs: dict[TopicPartition, list[int]], silent_polls: int | None) -> None:
        self.logs = logs  # timestamps by offset
        self.silent_polls = silent_polls
        self.now = 0.0
        self.pos: dict[TopicPartition, int] = {}
        self.polls: dict[TopicPartition, int] = {}
        self.answered: set[TopicPartition] = set()
        self.answer_offsets: dict[TopicPartition, int] = {}  # offsets_for_times; else 0
        self.asked_times: dict[TopicPartition, int] = {}

    def clock(self) -> float:
        return self.now

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos[tp] = offset
        self.polls[tp] = 0
        self.answered.discard(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.pos[tp]

    def pause(self, *tps: TopicPartition) -> None:
        pass

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: max(len(self.logs[tp]) - 1, 0) for tp in tps}  # short, as Tansu's

    async def offsets_for_times(
        self, since: dict[TopicPartition, int]
    ) -> dict[TopicPartition, Any]:
        self.asked_times = dict(since)
        return {tp: Answer(self.answer_offsets.get(tp, 0)) for tp in since}

    def highwater(self, tp: TopicPartition) -> int | None:
        return len(self.logs[tp]) if tp in self.answered else None

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[Rec]]:
        await asyncio.sleep(0)
        out = {}
        for tp in tps:
            self.polls[tp] += 1
            if self.silent_polls is None or self.polls[tp] <= self.silent_polls:
                continue
            self.answered.add(tp)
            at = self.pos[tp]
            recs = [Rec(o, t) for o, t in enumerate(self.logs[tp]) if o >= at][:max_records]
            if recs:
                out[tp] = recs
                self.pos[tp] = recs[-1].offset + 1
        if not out:
            self.now += timeout_ms / 1000
        return out


async def test_a_slow_broker_is_waited_for_however_many_polls_it_takes() -> None:
    consumer = SlowConsumer({TP0: [100, 200, 300]}, silent_polls=500)  # 10 s of 20 ms polls
    deadline = stall_deadline(60.0, consumer.clock)
    assert await _timestamp_at(consumer, TP0, 1, deadline) == 200  # type: ignore[arg-type]
    assert consumer.polls[TP0] == 501


async def test_the_first_timestamps_wait_for_every_partition_and_know_an_empty_one() -> None:
    consumer = SlowConsumer({TP0: [100, 200], TP1: []}, silent_polls=300)
    deadline = stall_deadline(60.0, consumer.clock)
    first = await _first_timestamps(consumer, [TP0, TP1], {TP0: 0, TP1: 0}, deadline)  # type: ignore[arg-type]
    assert first == {TP0: 100}  # TP1 is empty: its high watermark is its beginning


async def test_a_silent_broker_stops_the_search_after_stall_s_naming_the_record() -> None:
    consumer = SlowConsumer({TP0: [100, 200]}, silent_polls=None)
    deadline = stall_deadline(5.0, consumer.clock)
    with pytest.raises(
        LedgerStalled, match=r"nothing for 5s while reading the record at ledger:0:1"
    ):
        await _timestamp_at(consumer, TP0, 1, deadline)  # type: ignore[arg-type]
    assert 5.0 < consumer.now < 5.1


async def test_the_read_folds_to_the_end_and_a_known_end_costs_no_poll() -> None:
    consumer = SlowConsumer({TP0: [100, 200, 300], TP1: [400]}, silent_polls=3)
    consumer.seek(TP0, 1)
    consumer.seek(TP1, 1)
    consumer.answered.add(TP1)  # the start search saw TP1's end already
    folded: list[tuple[int, int]] = []
    deadline = stall_deadline(60.0, consumer.clock)
    total = await _read_to_end(
        consumer,  # type: ignore[arg-type]
        [TP0, TP1],
        lambda p, recs: folded.extend((p, r.offset) for r in recs),
        lambda p: True,
        10,
        deadline,
        5.0,
    )
    assert (total, folded) == (2, [(0, 1), (0, 2)])
    assert consumer.polls[TP1] == 0


async def test_a_silent_broker_stops_the_read_after_stall_s_naming_the_partitions() -> None:
    consumer = SlowConsumer({TP0: [100, 200]}, silent_polls=None)
    consumer.seek(TP0, 0)
    deadline = stall_deadline(5.0, consumer.clock)
    with pytest.raises(
        LedgerStalled, match=r"nothing for 5s while ledger partitions \[0\] still had records"
    ):
        await _read_to_end(consumer, [TP0], lambda p, r: None, lambda p: True, 10, deadline, 5.0)  # type: ignore[arg-type]
    assert 5.0 < consumer.now < 5.1


async def test_offsets_at_corrects_a_wrong_answer_and_keeps_a_right_one() -> None:
    logs = {TP0: [100 * i for i in range(1, 41)], TP1: [100 * i for i in range(1, 41)]}
    consumer = SlowConsumer(logs, silent_polls=0)
    consumer.answer_offsets = {TP1: 24}  # right for TP1; TP0 gets 0 (the embedded broker's)
    deadline = stall_deadline(60.0, consumer.clock)
    starts = await offsets_at(consumer, {TP0: 2_450, TP1: 2_450}, deadline)  # type: ignore[arg-type]
    assert starts == {TP0: 24, TP1: 24}  # the first record at or after 2,450 is 2,500
    assert set(consumer.asked_times) == {TP0, TP1}


async def test_offsets_at_knows_an_empty_partition_a_young_one_and_nothing_that_new() -> None:
    logs = {TP0: [], TP1: [500, 600, 700]}
    consumer = SlowConsumer(logs, silent_polls=0)
    deadline = stall_deadline(60.0, consumer.clock)
    assert await offsets_at(consumer, {TP0: 450, TP1: 450}, deadline) == {TP0: 0, TP1: 0}  # type: ignore[arg-type]
    assert consumer.asked_times == {}  # the first records answered it: no ListOffsets
    assert await offsets_at(consumer, {TP1: 10_000}, deadline) == {TP1: 3}  # type: ignore[arg-type]
