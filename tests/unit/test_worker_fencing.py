"""Fencing, batches and backlogs in the stitcher, without a broker (fake send, fake clocks)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from processor.settings import Settings
from processor.worker import Stitcher
from processor.worker._faust import MembershipLease
from processor.worker._stitcher import _Partition
from processor.worker._watchdog import Watchdog
from tests.unit.test_worker_stitcher import FakeSend, _chunk, _rec
from topics import RecordMeta, encode_headers


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass(frozen=True)
class KafkaRecord:
    """The attributes of aiokafka's ConsumerRecord that the batch path reads."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any
    timestamp: int


def _kr(offset: int, key: bytes, value: bytes, meta: RecordMeta, ts: int) -> KafkaRecord:
    return KafkaRecord(offset, key, value, encode_headers(meta), ts)


def _setup(
    **overrides: Any,
) -> tuple[Stitcher, FakeSend, list[float], MembershipLease, list[tuple[int, list[int]]]]:
    settings = Settings(idle_timeout_s=5, usage_grace_s=1, **overrides)
    send = FakeSend()
    now = [100.0]
    lease = MembershipLease(session_timeout_s=10, fraction=0.4, clock=lambda: now[0])
    lease.renew(now[0])
    acks: list[tuple[int, list[int]]] = []
    stitcher = Stitcher(
        settings,
        send,
        lambda: now[0],
        acker=lambda p, offsets: acks.append((p, list(offsets))),
        lease=lease,
    )
    stitcher.parts[0] = _Partition(loaded=True)
    return stitcher, send, now, lease, acks


def _statuses(send: FakeSend, topic: str) -> list[tuple[bytes | None, str]]:
    return [(k, json.loads(v or b"")["chunkstitch"]["status"]) for k, v, _ in send.on(topic)]


async def test_a_batch_is_one_round_and_its_acks_go_to_the_acker_in_offset_order() -> None:
    stitcher, send, _, _, acks = _setup()
    tp = TP(stitcher.settings.topic_chunks, 0)
    batch = [
        _kr(0, b"a", _chunk("x", "stop"), RecordMeta(seq=0), 1000),
        _kr(1, b"b", _chunk("y"), RecordMeta(seq=0), 1001),
        _kr(2, b"a", b"", RecordMeta(end_count=1, end_reason="done"), 1002),
        _kr(3, b"k", b"not json", RecordMeta(), 1003),
    ]
    assert await stitcher.handle_batch([(tp, batch)])
    await stitcher.drain()
    assert _statuses(send, stitcher.settings.topic_responses) == [(b"a", "complete")]
    assert acks == [(0, [0])]  # offset 1 belongs to the open stream b: nothing passes it
    assert list(send.on(stitcher.settings.topic_deadletter))


async def test_a_batch_fetched_before_a_rebalance_is_not_taken() -> None:
    stitcher, send, _, _, _acks = _setup()
    tp = TP(stitcher.settings.topic_chunks, 0)
    batch = [_kr(0, b"a", _chunk("x", "stop"), RecordMeta(), 1000)]
    assert not await stitcher.handle_batch([(tp, batch)], lambda: False)
    assert stitcher.parts[0].held == type(stitcher.parts[0].held)()
    assert send.sent == []


async def test_no_output_and_no_time_rule_while_the_lease_is_not_valid() -> None:
    stitcher, send, now, lease, _acks = _setup()
    await stitcher.handle(_rec(0, b"c1", _chunk("partial")))
    await stitcher.flush()
    # the worker is paused past the idle timeout: nobody renews the lease
    now[0] += 60
    stitcher.tick()
    await stitcher.flush()
    assert send.sent == []
    assert 0 in stitcher.parts
    assert "c1" in stitcher.parts[0].open
    # a record-driven emission is held too
    await stitcher.handle(_rec(1, b"c2", _chunk("done", "stop")))
    await stitcher.handle(_rec(2, b"c2", b"", RecordMeta(end_count=1, end_reason="done")))
    await stitcher.flush()
    assert send.sent == []
    # the coordinator vouches for the member again: the held output goes, idle is judged
    lease.renew(now[0])
    await stitcher.flush()
    await stitcher.drain()
    assert _statuses(send, stitcher.settings.topic_responses) == [(b"c2", "complete")]


async def test_outputs_held_for_a_revoked_partition_are_never_sent() -> None:
    stitcher, send, now, lease, acks = _setup()
    await stitcher.handle(_rec(0, b"c1", _chunk("done", "stop")))
    await stitcher.handle(_rec(1, b"c1", b"", RecordMeta(end_count=1, end_reason="done")))
    await stitcher.handle(_rec(2, b"k", b"not json"))
    lease.revoke()
    await stitcher.flush()
    stitcher.revoke([0])  # the partition moved while this worker could not emit
    lease.renew(now[0])
    await stitcher.flush()
    await stitcher.drain()
    assert send.sent == []
    assert acks == []


async def test_a_partition_with_lag_is_judged_by_its_record_timestamps_not_the_wall_clock() -> None:
    stitcher, send, now, lease, _ = _setup()
    tp = TP(stitcher.settings.topic_chunks, 0)
    await stitcher.handle_batch([(tp, [_kr(0, b"slow", _chunk("a"), RecordMeta(seq=0), 10_000)])])
    stitcher.fetched({0: 50_000})  # 49,999 records still wait in the partition
    now[0] += 60  # far past the idle timeout by the wall clock
    lease.renew(now[0])
    stitcher.tick()
    await stitcher.flush()
    assert send.on(stitcher.settings.topic_responses) == []  # its next chunk may be waiting
    # the partition's own clock moves on: another stream's chunk 3 s later, then 6 s later
    await stitcher.handle_batch([(tp, [_kr(1, b"x", _chunk("b"), RecordMeta(seq=0), 13_000)])])
    stitcher.tick()
    await stitcher.flush()
    assert send.on(stitcher.settings.topic_responses) == []
    await stitcher.handle_batch([(tp, [_kr(2, b"x", _chunk("c"), RecordMeta(seq=1), 16_000)])])
    stitcher.tick()
    await stitcher.flush()
    await stitcher.drain()
    assert _statuses(send, stitcher.settings.topic_responses) == [(b"slow", "incomplete")]


async def test_a_caught_up_partition_uses_the_wall_clock() -> None:
    stitcher, send, now, lease, _ = _setup()
    tp = TP(stitcher.settings.topic_chunks, 0)
    await stitcher.handle_batch([(tp, [_kr(0, b"s", _chunk("a"), RecordMeta(seq=0), 10_000)])])
    stitcher.fetched({0: 1})
    now[0] += 6
    lease.renew(now[0])
    stitcher.tick()
    await stitcher.flush()
    await stitcher.drain()
    assert _statuses(send, stitcher.settings.topic_responses) == [(b"s", "incomplete")]


def test_the_ledger_keeps_the_highest_offset_whoever_wrote_last() -> None:
    stitcher, *_ = _setup()
    part = _Partition()

    @dataclass
    class LedgerRecord:
        key: bytes
        value: bytes
        offset: int
        timestamp: int

    records = [
        LedgerRecord(b"c1", b"40", 0, 0),
        LedgerRecord(b"c1", b"12", 1, 0),  # a stale worker's late write
        LedgerRecord(b"c2", b"7", 2, 0),
    ]
    stitcher._fold_ledger(0, part, records)
    assert part.ledger == {"c1": 40, "c2": 7}


async def test_emitted_ids_expire_after_the_memory_window() -> None:
    stitcher, _send, now, lease, _ = _setup(emitted_memory_s=700)
    await stitcher.handle(_rec(0, b"c1", _chunk("x", "stop")))
    await stitcher.handle(_rec(1, b"c1", b"", RecordMeta(end_count=1, end_reason="done")))
    await stitcher.flush()
    assert stitcher.parts[0].ledger == {"c1": 1}
    now[0] += 701
    lease.renew(now[0])
    stitcher.tick()
    assert stitcher.parts[0].ledger == {}
    assert not stitcher.parts[0].emitted


def test_the_lease_lasts_a_fraction_of_the_session_from_when_the_heartbeat_was_sent() -> None:
    now = [0.0]
    lease = MembershipLease(session_timeout_s=6, fraction=0.4, clock=lambda: now[0])
    assert not lease.valid()
    lease.renew(sent_at=10.0)
    now[0] = 12.3
    assert lease.valid()
    now[0] = 12.5
    assert not lease.valid()
    assert lease.lost_at == 12.5
    lease.renew(sent_at=12.6)
    lease.renew(sent_at=11.0)  # an older answer never shortens it
    now[0] = 14.9
    assert lease.valid()
    lease.revoke()
    assert not lease.valid()


def test_the_watchdog_names_the_longest_wait_beyond_the_stall_timeout() -> None:
    dog = Watchdog(stall_timeout_s=30, clock=lambda: 100.0)
    dog.add("produce acknowledgements", lambda now: 12.0)
    dog.add("the coordinator", lambda now: 45.0)
    dog.add("idle", lambda now: 0.0)
    assert dog.stalled() == ("the coordinator", 45.0)
    assert dog.long_waits(10) == ["produce acknowledgements", "the coordinator"]
    assert Watchdog(30, clock=lambda: 0.0).stalled() is None


async def test_a_record_timestamp_far_ahead_of_the_clock_never_moves_stream_time() -> None:
    stitcher, send, now, lease, _ = _setup()
    tp = TP(stitcher.settings.topic_chunks, 0)
    await stitcher.handle_batch([(tp, [_kr(0, b"s", _chunk("a"), RecordMeta(seq=0), 10_000)])])
    future = int((time.time() + 365 * 86400) * 1000)
    await stitcher.handle_batch([(tp, [_kr(1, b"x", _chunk("b"), RecordMeta(seq=0), future)])])
    stitcher.fetched({0: 50_000})  # lagging: judged by stream time
    lease.renew(now[0])
    stitcher.tick()
    await stitcher.flush()
    assert stitcher.parts[0].stream_time_ms == 10_000
    assert send.on(stitcher.settings.topic_responses) == []


async def test_acks_keep_offset_order_when_both_ack_paths_meet_on_a_partition() -> None:
    stitcher, *_ = _setup()
    order: list[object] = []
    stitcher.acker = lambda p, offsets: order.append(list(offsets))
    tp = TP(stitcher.settings.topic_chunks, 0)
    await stitcher.handle_batch([(tp, [_kr(0, b"k", b"not json", RecordMeta(), 1)])])
    await stitcher.handle(_rec(1, b"k", b"not json"), lambda: order.append("one"))
    await stitcher.handle_batch([(tp, [_kr(2, b"k", b"not json", RecordMeta(), 3)])])
    await stitcher.flush()
    await stitcher.drain()
    assert order == [[0], "one", [2]]
