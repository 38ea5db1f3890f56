"""The worker's stitcher without a broker: a fake producer, a fake clock."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

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
        return self._delivery()

    def _delivery(self) -> asyncio.Future[Any]:
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
    await stitcher.drain()
    assert acked == []  # offset 1 is done, but 0 is still open: nothing passes it
    await stitcher.handle(
        _rec(2, b"c1", _chunk("b", "stop"), RecordMeta(seq=1)), lambda: acked.append(2)
    )
    await stitcher.handle(
        _rec(3, b"c1", b"", RecordMeta(end_count=2, end_reason="done")), lambda: acked.append(3)
    )
    await stitcher.flush()
    await stitcher.drain()
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
    stitcher.parts[0].ledger["c1"] = 5
    await stitcher.handle(_rec(4, b"c1", _chunk("a"), RecordMeta(seq=0)), lambda: acked.append(4))
    await stitcher.handle(_rec(9, b"c1", _chunk("z"), RecordMeta(seq=7)), lambda: acked.append(9))
    await stitcher.flush()
    await stitcher.drain()
    assert acked == [4, 9]
    assert send.on(stitcher.settings.topic_responses) == []
    ((_, letter, _),) = send.on(stitcher.settings.topic_deadletter)
    assert json.loads(letter or b"")["reason"] == "late_chunk"


async def test_idle_timeout_emits_incomplete_from_the_timer() -> None:
    stitcher, send, now, acked = _setup()
    await stitcher.handle(_rec(0, b"c1", _chunk("partial")), lambda: acked.append(0))
    await stitcher.flush()
    await stitcher.drain()
    stitcher.tick()
    await stitcher.flush()
    await stitcher.drain()
    assert acked == []
    now[0] += 5
    stitcher.tick()
    await stitcher.flush()
    await stitcher.drain()
    assert acked == [0]
    ((_, value, _),) = send.on(stitcher.settings.topic_responses)
    meta = json.loads(value or b"")["chunkstitch"]
    assert meta["status"] == "incomplete"
    assert "idle" in meta["reason"]


async def test_keyless_record_is_rerouted_by_its_id() -> None:
    stitcher, send, _, acked = _setup()
    await stitcher.handle(_rec(0, None, _chunk("x")), lambda: acked.append(0))
    await stitcher.flush()
    await stitcher.drain()
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


class GatedSend(FakeSend):
    """Deliveries complete only when the test says so (or fail with ``error``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[asyncio.Future[Any]] = []

    def _delivery(self) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        return fut

    def deliver(self, error: BaseException | None = None) -> None:
        for fut in self.pending:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)


async def _one_completion(stitcher: Stitcher, cid: bytes, first: int, acked: list[int]) -> None:
    body = json.dumps(
        {"id": cid.decode(), "choices": [{"index": 0, "delta": {"content": "x"}}]}
    ).encode()
    await stitcher.handle(_rec(first, cid, body, RecordMeta(seq=0)), lambda: acked.append(first))
    await stitcher.handle(
        _rec(first + 1, cid, b"", RecordMeta(end_count=1, end_reason="done")),
        lambda: acked.append(first + 1),
    )


async def test_a_sealed_round_is_released_only_when_durable_and_the_next_round_proceeds() -> None:
    settings = Settings()
    send = GatedSend()
    stitcher = Stitcher(settings, send, lambda: 100.0)
    stitcher.parts[0] = _Partition(loaded=True)
    acked: list[int] = []
    await _one_completion(stitcher, b"a", 0, acked)
    await stitcher.flush()  # sends the response, does not wait for its acknowledgement
    assert [t for t, *_ in send.sent] == [settings.topic_responses]
    assert stitcher.rounds_in_flight == 1
    await _one_completion(stitcher, b"b", 2, acked)
    await stitcher.flush()
    await asyncio.sleep(0)
    assert acked == []  # nothing is durable yet
    assert send.on(settings.topic_ledger) == []  # the ledger waits for the responses
    for _ in range(50):  # responses, then the ledger records sent once those are durable
        send.deliver()
        await asyncio.sleep(0)
        if not stitcher.rounds_in_flight:
            break
    await asyncio.wait_for(stitcher.drain(), timeout=5)
    assert acked == [0, 1, 2, 3]
    assert sorted(k for k, _, _ in send.on(settings.topic_ledger)) == [b"a", b"b"]


async def test_a_round_that_cannot_be_made_durable_stops_the_stitcher_and_holds_its_acks() -> None:
    send = GatedSend()
    stitcher = Stitcher(Settings(), send, lambda: 100.0)
    stitcher.parts[0] = _Partition(loaded=True)
    failures: list[BaseException] = []
    stitcher.on_failure = failures.append
    acked: list[int] = []
    await _one_completion(stitcher, b"a", 0, acked)
    await stitcher.flush()
    send.deliver(RuntimeError("broker gone"))
    with pytest.raises(RuntimeError, match="broker gone"):
        await asyncio.wait_for(stitcher.drain(), timeout=5)
    assert acked == []
    assert [str(e) for e in failures] == ["broker gone"]
    assert send.on(Settings().topic_ledger) == []  # never a ledger entry for a lost response
    await _one_completion(stitcher, b"b", 2, acked)
    with pytest.raises(RuntimeError, match="broker gone"):
        await stitcher.flush()


async def test_a_response_over_the_record_limit_is_emitted_as_an_error_without_bodies() -> None:
    stitcher, send, _, acked = _setup()
    stitcher.settings = Settings(max_response_bytes=2048)
    await stitcher.handle(
        _rec(0, b"c1", _chunk("y" * 5000, "stop"), RecordMeta(seq=0)), lambda: acked.append(0)
    )
    await stitcher.handle(
        _rec(1, b"c1", b"", RecordMeta(end_count=1, end_reason="done")), lambda: acked.append(1)
    )
    await stitcher.flush()
    await stitcher.drain()
    ((_, value, _),) = send.on(stitcher.settings.topic_responses)
    assert value is not None
    assert len(value) <= 2048
    body = json.loads(value)
    assert body["chunkstitch"]["status"] == "error"
    assert "max_response_bytes=2048" in body["chunkstitch"]["reason"]
    assert "content" not in body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert acked == [0, 1]


async def test_a_dead_letter_keeps_at_most_the_value_limit_and_says_so() -> None:
    from topics import DEADLETTER_VALUE_MAX

    stitcher, send, _, acked = _setup()
    stitcher.settings = Settings(max_record_bytes=1024)
    big = b"z" * (DEADLETTER_VALUE_MAX + 10)
    await stitcher.handle(_rec(0, b"k", big), lambda: acked.append(0))
    await stitcher.flush()
    await stitcher.drain()
    ((_, letter, _),) = send.on(stitcher.settings.topic_deadletter)
    body = json.loads(letter or b"")
    assert body["reason"] == "oversize"
    assert body["value_size"] == len(big)
    assert body["value_truncated"] is True
    assert len(base64.b64decode(body["value_b64"])) == DEADLETTER_VALUE_MAX


async def test_keyed_stream_is_one_completion_whatever_its_chunks_ids_say() -> None:
    """Groq compound models give every chunk of one answer a new ``id`` (the last one
    "stub"). In the worker the record key is the stream's identity: one completion."""
    stitcher, send, _, acked = _setup()
    pieces = ["Search", "ing", " done", "."]
    for seq, piece in enumerate(pieces):
        value = json.loads(_chunk(piece))
        value["id"] = f"chatcmpl-{seq}-{piece}"  # a new id on every chunk
        await stitcher.handle(
            _rec(seq, b"groq-stream", json.dumps(value).encode(), RecordMeta(seq=seq)),
            lambda s=seq: acked.append(s),
        )
    last = json.loads(_chunk("", "stop"))
    last["id"] = "stub"
    n = len(pieces)
    await stitcher.handle(
        _rec(n, b"groq-stream", json.dumps(last).encode(), RecordMeta(seq=n)), lambda: None
    )
    await stitcher.handle(
        _rec(n + 1, b"groq-stream", b"", RecordMeta(end_count=n + 1, end_reason="done")),
        lambda: None,
    )
    await stitcher.flush()
    await stitcher.drain()
    ((key, value, _),) = send.on(stitcher.settings.topic_responses)
    body = json.loads(value or b"")
    assert key == b"groq-stream"
    assert body["id"] == "groq-stream"
    assert body["choices"][0]["message"]["content"] == "Searching done."
    assert body["chunkstitch"]["status"] == "complete"
    assert body["chunkstitch"]["chunk_count"] == n + 1


async def test_idle_reason_and_missing_chunks_agree_when_the_last_chunk_never_came() -> None:
    """Issue 15: "1 of 21 chunks never arrived" while missing_chunks said 0."""
    stitcher, send, now, _ = _setup()
    for seq in range(20):
        await stitcher.handle(_rec(seq, b"c1", _chunk("x"), RecordMeta(seq=seq)), lambda: None)
    await stitcher.handle(
        _rec(20, b"c1", b"", RecordMeta(end_count=21, end_reason="done")), lambda: None
    )
    now[0] += stitcher.settings.idle_timeout_s + 1
    stitcher.tick()
    await stitcher.flush()
    await stitcher.drain()
    ((_, value, _),) = send.on(stitcher.settings.topic_responses)
    meta = json.loads(value or b"")["chunkstitch"]
    assert "1 of 21 chunks never arrived" in meta["reason"]
    assert meta["missing_chunks"] == 1


async def test_user_and_allowlisted_attributes_reach_the_response_bad_labels_are_ignored() -> None:
    from processor import metrics

    settings = Settings(idle_timeout_s=5, usage_grace_s=1, usage_attributes="feature,env:5")
    send = FakeSend()
    stitcher = Stitcher(settings, send, lambda: 100.0)
    stitcher.parts[0] = _Partition(loaded=True)
    ignored = metrics.HEADERS_IGNORED.labels("cs-attr-*")
    before = ignored._value.get()
    headers = [
        ("cs-seq", b"0"),
        ("cs-user", "Zoë".encode()),
        ("cs-attr-feature", b"search"),
        ("cs-attr-secret", b"not allowlisted"),
        ("cs-attr-env", b"bad\x01value"),
        ("cs-attr-Bad-Name", b"x"),
    ]
    rec = Record("chunkstitch.chunks", 0, 0, b"c1", _chunk("hi", "stop"), headers, 1000)
    await stitcher.handle(rec, lambda: None)
    end = Record("chunkstitch.chunks", 0, 1, b"c1", b"", [("cs-end", b"1"), *headers[1:]], 1001)
    await stitcher.handle(end, lambda: None)
    await stitcher.flush()
    assert send.on(settings.topic_deadletter) == []  # a label never dead-letters the chunk
    ((_, value, _),) = send.on(settings.topic_responses)
    meta = json.loads(value or b"")["chunkstitch"]
    assert meta["status"] == "complete"
    assert meta["user"] == "Zoë"
    assert meta["attributes"] == {"feature": "search"}  # secret: unlisted; env: not valid
    assert ignored._value.get() - before == 3  # once per completion: secret, env, Bad-Name


def test_decoded_labels_and_what_is_wrong_with_them() -> None:
    from topics._headers import LABEL_MAX_BYTES, decode_headers

    meta = decode_headers(
        [
            ("cs-user", b"alice"),
            ("cs-attr-env", b"prod"),
            ("cs-attr-api_key", b"k1"),
            ("cs-attr-feature", b""),  # empty: absent
            ("cs-user-x", b"not a label header"),  # unknown cs-* header: ignored
            ("cs-attr-long", b"x" * (LABEL_MAX_BYTES + 1)),
            ("cs-attr-bin", b"\xff"),
        ]
    )
    assert meta.user == "alice"
    assert meta.attributes == (("api_key", "k1"), ("env", "prod"))
    problems = dict(meta.ignored)
    assert "longer than 256 bytes" in problems["cs-attr-long"]
    assert "not valid UTF-8" in problems["cs-attr-bin"]
    again = decode_headers(encode_headers(meta))
    assert (again.user, again.attributes) == (meta.user, meta.attributes)
