"""The worker's stitcher without a broker: a fake producer, a fake clock."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from processor.settings import Settings
from processor.worker import Record, Stitcher
from processor.worker._stitcher import _Partition
from topics import RecordMeta, encode_headers


class FakeSend:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    async def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, partition))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None, int | None]]:
        return [(k, v, p) for t, k, v, p in self.sent if t == topic]


def _setup() -> tuple[Stitcher, FakeSend, list[float], list[int]]:
    settings = Settings(idle_timeout_s=5, usage_grace_s=1)
    send = FakeSend()
    now = [100.0]
    stitcher = Stitcher(settings, send, lambda: now[0])
    stitcher.parts[0] = _Partition(loaded=True)
    return stitcher, send, now, []


def _rec(offset: int, key: bytes | None, value: bytes, meta: RecordMeta | None = None) -> Record:
    return Record(
        "chunkstitch.chunks",
        0,
        offset,
        key,
        value,
        encode_headers(meta or RecordMeta()),
        1000 + offset,
    )


def _chunk(text: str, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
    if finish:
        choice["finish_reason"] = finish
    return json.dumps({"id": "c1", "choices": [choice]}).encode()


async def test_acks_are_held_until_emission_and_released_in_offset_order() -> None:
    stitcher, send, _, acked = _setup()
    s = stitcher.settings
    # Offset 0 and 2 belong to c1 (open), offset 1 is a dead letter (done at once).
    await stitcher.handle(_rec(0, b"c1", _chunk("a"), RecordMeta(seq=0)), lambda: acked.append(0))
    await stitcher.handle(_rec(1, b"k", b"not json"), lambda: acked.append(1))
    await stitcher.flush()
    assert acked == []  # offset 1 is done, but 0 is still open: nothing passes it
    await stitcher.handle(
        _rec(2, b"c1", _chunk("b", "stop"), RecordMeta(seq=1)), lambda: acked.append(2)
    )
    await stitcher.handle(
        _rec(3, b"c1", b"", RecordMeta(end_count=2, end_reason="done")), lambda: acked.append(3)
    )
    await stitcher.flush()
    assert acked == [0, 1, 2, 3]
    ((key, value, _),) = send.on(s.topic_responses)
    assert key == b"c1"
    body = json.loads(value or b"")
    assert body["choices"][0]["message"]["content"] == "ab"
    assert body["chunkstitch"]["source"] == {
        "topic": "chunkstitch.chunks",
        "partition": 0,
        "first_offset": 0,
        "last_offset": 3,
    }
    assert send.on(s.topic_ledger) == [(b"c1", b"3", 0)]


async def test_ledger_skips_replayed_chunks_and_dead_letters_late_ones() -> None:
    stitcher, send, _, acked = _setup()
    stitcher.parts[0].ledger["c1"] = (5, 100.0)
    await stitcher.handle(_rec(4, b"c1", _chunk("a"), RecordMeta(seq=0)), lambda: acked.append(4))
    await stitcher.handle(_rec(9, b"c1", _chunk("z"), RecordMeta(seq=7)), lambda: acked.append(9))
    await stitcher.flush()
    assert acked == [4, 9]
    assert send.on(stitcher.settings.topic_responses) == []
    ((_, letter, _),) = send.on(stitcher.settings.topic_deadletter)
    assert json.loads(letter or b"")["reason"] == "late_chunk"


async def test_idle_timeout_emits_incomplete_from_the_timer() -> None:
    stitcher, send, now, acked = _setup()
    await stitcher.handle(_rec(0, b"c1", _chunk("partial")), lambda: acked.append(0))
    await stitcher.flush()
    stitcher.tick()
    await stitcher.flush()
    assert acked == []
    now[0] += 5
    stitcher.tick()
    await stitcher.flush()
    assert acked == [0]
    ((_, value, _),) = send.on(stitcher.settings.topic_responses)
    meta = json.loads(value or b"")["chunkstitch"]
    assert meta["status"] == "incomplete"
    assert "idle" in meta["reason"]


async def test_keyless_record_is_rerouted_by_its_id() -> None:
    stitcher, send, _, acked = _setup()
    await stitcher.handle(_rec(0, None, _chunk("x")), lambda: acked.append(0))
    await stitcher.flush()
    assert acked == [0]
    ((key, value, partition),) = send.on("chunkstitch.chunks")
    assert key == b"c1"
    assert value == _chunk("x")
    assert partition is None


async def test_revoked_partition_state_is_dropped() -> None:
    stitcher, _, _, acked = _setup()
    await stitcher.handle(_rec(0, b"c1", _chunk("a")), lambda: acked.append(0))
    stitcher.revoke([0])
    assert 0 not in stitcher.parts
