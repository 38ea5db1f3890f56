"""No record, header or timer path can make the stitcher raise, and no record disappears.

Driven through the stitcher's public interface (``handle``, ``tick``, ``flush``) with a
fake producer and a fake clock, as tests/unit/test_worker_stitcher.py does. The property
test feeds arbitrary JSON values (non-finite floats, huge integers, deep nesting, wrong
types in known fields), arbitrary bytes and arbitrary headers; the example tests pin the
range-checked headers and the guarded emission.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor import metrics
from processor.core import contribution
from processor.settings import Settings
from processor.worker import Record, Stitcher
from processor.worker._stitcher import Assembler, _Partition
from topics import ChatCompletion, DeadLetter, RecordMeta, encode_headers

TOPIC = "chunkstitch.chunks"


class FakeSend:
    """The producer: records what was sent; every delivery succeeds at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, list(headers or ())))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def values(self, topic: str) -> list[bytes]:
        return [v or b"" for t, _, v, _ in self.sent if t == topic]


def _stitcher(
    settings: Settings | None = None, **overrides: Any
) -> tuple[Stitcher, FakeSend, list[float]]:
    config: dict[str, Any] = {"idle_timeout_s": 5, "usage_grace_s": 1, **overrides}
    send = FakeSend()
    now = [1000.0]
    stitcher = Stitcher(settings or Settings(**config), send, lambda: now[0])
    stitcher.parts[0] = _Partition(loaded=True)
    stitcher.parts[1] = _Partition(loaded=True)
    return stitcher, send, now


def _rec(
    offset: int,
    key: bytes | None,
    value: bytes,
    meta: RecordMeta | None = None,
    ts: int | None = 1_760_000_000_000,
) -> Record:
    return Record(TOPIC, 0, offset, key, value, encode_headers(meta or RecordMeta()), ts)


def _chunk(cid: str, text: str, finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
    if finish:
        choice["finish_reason"] = finish
    return json.dumps({"id": cid, "choices": [choice]}).encode()


async def _settle(stitcher: Stitcher) -> None:
    await stitcher.flush()
    await stitcher.drain()


def _letters(send: FakeSend, settings: Settings) -> list[dict[str, Any]]:
    return [json.loads(v) for v in send.values(settings.topic_deadletter)]


def _responses(send: FakeSend, settings: Settings) -> dict[str, dict[str, Any]]:
    return {json.loads(v)["id"]: json.loads(v) for v in send.values(settings.topic_responses)}


# -- range-checked headers -------------------------------------------------------------------
@pytest.mark.parametrize("started", [10**30, 1_760_000_000, 0, 1_760_000_000_000 + 2 * 86_400_000])
async def test_an_implausible_started_at_is_ignored_counted_and_never_the_event_time(
    started: int,
) -> None:
    stitcher, send, _ = _stitcher()
    acked: list[int] = []
    ignored = metrics.HEADERS_IGNORED.labels("cs-started-at")
    before = ignored._value.get()
    for offset, (value, meta) in enumerate(
        [
            (_chunk("c1", "a"), RecordMeta(seq=0, started_at_ms=started)),
            (_chunk("c1", "b", "stop"), RecordMeta(seq=1, started_at_ms=started)),
            (b"", RecordMeta(end_count=2, end_reason="done")),
        ]
    ):
        await stitcher.handle(_rec(offset, b"c1", value, meta), lambda o=offset: acked.append(o))
    await _settle(stitcher)
    meta = _responses(send, stitcher.settings)["c1"]["chunkstitch"]
    assert meta["status"] == "complete"
    assert "request_started_at_ms" not in meta
    assert meta["first_chunk_at_ms"] == 1_760_000_000_000
    assert "time_to_first_chunk_ms" not in meta
    assert ignored._value.get() - before == 2  # both records that carried it
    assert acked == [0, 1, 2]


async def test_a_plausible_started_at_is_kept() -> None:
    stitcher, send, _ = _stitcher()
    started = 1_760_000_000_000 - 250
    await stitcher.handle(
        _rec(0, b"c1", _chunk("c1", "a", "stop"), RecordMeta(seq=0, started_at_ms=started)),
        lambda: None,
    )
    await stitcher.handle(_rec(1, b"c1", b"", RecordMeta(end_count=1)), lambda: None)
    await _settle(stitcher)
    meta = _responses(send, stitcher.settings)["c1"]["chunkstitch"]
    assert meta["request_started_at_ms"] == started
    assert meta["time_to_first_chunk_ms"] == 250


@pytest.mark.parametrize(
    ("meta", "header"),
    [
        (RecordMeta(seq=20), "cs-seq"),
        (RecordMeta(seq=10**30), "cs-seq"),
        (RecordMeta(end_count=21, end_reason="done"), "cs-end"),
    ],
)
async def test_seq_or_end_beyond_max_chunks_is_a_dead_letter_at_once(
    meta: RecordMeta, header: str
) -> None:
    stitcher, send, _ = _stitcher(max_chunks=20)
    acked: list[int] = []
    await stitcher.handle(_rec(0, b"c1", _chunk("c1", "a"), RecordMeta(seq=0)), lambda: None)
    value = b"" if meta.end_count is not None else _chunk("c1", "b")
    await stitcher.handle(_rec(1, b"c1", value, meta), lambda: acked.append(1))
    await _settle(stitcher)
    (letter,) = _letters(send, stitcher.settings)
    assert letter["reason"] == "bad_header"
    assert header in letter["message"]
    assert "max_chunks=20" in letter["message"]
    assert letter["source_offset"] == 1
    assert acked == []  # offset 0 (the open stream) is ahead of it, still held
    stream = stitcher.parts[0].open["c1"]
    assert stream.offsets == [0]
    assert stream.clock.end_count is None


async def test_seq_and_end_at_the_limit_are_accepted() -> None:
    stitcher, send, _ = _stitcher(max_chunks=2)
    await stitcher.handle(_rec(0, b"c1", _chunk("c1", "a"), RecordMeta(seq=1)), lambda: None)
    await stitcher.handle(_rec(1, b"c1", b"", RecordMeta(end_count=2)), lambda: None)
    await _settle(stitcher)
    assert _letters(send, stitcher.settings) == []


async def test_a_key_or_keyless_id_longer_than_the_limit_is_an_oversize_dead_letter() -> None:
    stitcher, send, _ = _stitcher()
    acked: list[int] = []
    await stitcher.handle(_rec(0, b"k" * 1025, _chunk("c1", "a")), lambda: acked.append(0))
    await stitcher.handle(_rec(1, None, _chunk("i" * 1025, "a")), lambda: acked.append(1))
    await _settle(stitcher)
    letters = _letters(send, stitcher.settings)
    assert [x["reason"] for x in letters] == ["oversize", "oversize"]
    assert "1024" in letters[0]["message"]
    assert not [t for t, *_ in send.sent if t == TOPIC]  # never re-routed
    assert acked == [0, 1]


async def test_a_response_too_large_even_without_bodies_is_emitted_bare_within_the_limit() -> None:
    stitcher, send, _ = _stitcher(max_response_bytes=2048)
    extra = {f"vendor_{i}": "v" * 200 for i in range(20)}  # unknown fields are kept
    value = json.dumps(
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
        | extra
    ).encode()
    await stitcher.handle(_rec(0, b"c1", value, RecordMeta(seq=0)), lambda: None)
    await stitcher.handle(_rec(1, b"c1", b"", RecordMeta(end_count=1)), lambda: None)
    await _settle(stitcher)
    (body,) = send.values(stitcher.settings.topic_responses)
    assert len(body) <= 2048
    response = ChatCompletion.model_validate_json(body)
    assert response.chunkstitch.status == "error"
    assert "even without its message bodies" in (response.chunkstitch.reason or "")
    assert response.choices[0].finish_reason == "stop"
    assert response.chunkstitch.source is not None


# -- guarded emission --------------------------------------------------------------------
@pytest.fixture
def faulty_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injected into the assembler: finishing a completion whose id starts with
    ``boom`` raises (what a chunk with ``index: 1e999`` behind a gap did before it was
    rejected at validation)."""
    real = Assembler.finish

    def finish(self: Assembler, **kwargs: Any) -> ChatCompletion:
        if (self.completion_id or "").startswith("boom"):
            raise OverflowError("cannot convert float infinity to integer")
        return real(self, **kwargs)

    monkeypatch.setattr(Assembler, "finish", finish)


@pytest.mark.usefixtures("faulty_finish")
async def test_a_stream_failing_in_the_timer_path_becomes_an_error_and_others_go_on() -> None:
    stitcher, send, now = _stitcher()
    acked: list[int] = []
    records = [
        (b"boom-1", _chunk("boom-1", "a"), RecordMeta(seq=0, tenant="t", provider="p")),
        (b"ok-1", _chunk("ok-1", "x"), RecordMeta()),
        (b"boom-1", _chunk("boom-1", "c", "stop"), RecordMeta(seq=2)),  # behind a gap
        (b"ok-2", _chunk("ok-2", "y"), RecordMeta()),
    ]
    for offset, (key, value, meta) in enumerate(records):
        await stitcher.handle(_rec(offset, key, value, meta), lambda o=offset: acked.append(o))
    await _settle(stitcher)
    now[0] += 5
    stitcher.tick()  # every stream idles out; boom-1 fails while being finished
    await _settle(stitcher)
    s = stitcher.settings
    responses = _responses(send, s)
    assert set(responses) == {"boom-1", "ok-1", "ok-2"}
    boom = responses["boom-1"]["chunkstitch"]
    assert boom["status"] == "error"
    assert "internal error" in boom["reason"]
    assert "OverflowError" in boom["reason"]
    assert (boom["tenant"], boom["provider"]) == ("t", "p")
    assert (boom["chunk_count"], boom["missing_chunks"]) == (2, 1)
    assert boom["source"] == {
        "topic": s.topic_chunks,
        "partition": 0,
        "first_offset": 0,
        "last_offset": 2,
    }
    ChatCompletion.model_validate(responses["boom-1"])
    assert responses["ok-1"]["chunkstitch"]["status"] == "incomplete"
    (letter,) = _letters(send, s)
    DeadLetter.model_validate(letter)
    assert letter["reason"] == "internal_error"
    assert letter["completion_id"] == "boom-1"
    assert letter["source_offset"] == 2
    assert base64.b64decode(letter["key_b64"]) == b"boom-1"
    assert "offsets 0..2" in letter["message"]
    assert acked == [0, 1, 2, 3]
    assert stitcher.parts[0].ledger["boom-1"] == 2  # a replay of its chunks is skipped
    await stitcher.handle(
        _rec(0, b"boom-1", _chunk("boom-1", "a"), RecordMeta(seq=0)), lambda: None
    )
    assert "boom-1" not in stitcher.parts[0].open


@pytest.mark.usefixtures("faulty_finish")
async def test_a_stream_failing_in_the_record_path_becomes_an_error_too() -> None:
    stitcher, send, _ = _stitcher()
    acked: list[int] = []
    await stitcher.handle(
        _rec(0, b"boom-2", _chunk("boom-2", "a", "stop"), RecordMeta(seq=0)),
        lambda: acked.append(0),
    )
    await stitcher.handle(
        _rec(1, b"boom-2", b"", RecordMeta(end_count=1, end_reason="done")), lambda: acked.append(1)
    )
    await stitcher.handle(
        _rec(2, b"ok", _chunk("ok", "z", "stop"), RecordMeta(seq=0)), lambda: acked.append(2)
    )
    await stitcher.handle(_rec(3, b"ok", b"", RecordMeta(end_count=1)), lambda: acked.append(3))
    await _settle(stitcher)
    responses = _responses(send, stitcher.settings)
    assert responses["boom-2"]["chunkstitch"]["status"] == "error"
    assert responses["ok"]["chunkstitch"]["status"] == "complete"
    assert [x["reason"] for x in _letters(send, stitcher.settings)] == ["internal_error"]
    assert acked == [0, 1, 2, 3]


# -- the property ------------------------------------------------------------------------
_POISON = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "1" + "0" * 30,
    "-" + "9" * 25,
    "1e-999",
    "-0.0",
    "1.7976931348623157e308",
    "[" * 150 + "]" * 150,
    "{" + '"a":{' * 120 + "}" * 121,
    "[" * 400 + "]" * 400,
]
"""Literals json.dumps cannot write: they are spliced in for placeholder strings."""

_MARK = "\x00poison\x00"
_poison = st.integers(0, len(_POISON) - 1).map(lambda i: f"{_MARK}{i}")
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | _poison
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_small = st.integers(0, 1)
_bad_number = st.one_of(st.integers(-(2**64), 2**64), st.floats(), _poison, _json)


def _weighted(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` nine times in ten, else ``bad`` (streams must form, poison must appear)."""
    return st.sampled_from([good] * 9 + [bad]).flatmap(lambda strategy: strategy)


_number = _weighted(_small, _bad_number)
_text = st.text(max_size=8) | st.just("y" * 300)
_ids = st.sampled_from(["a", "b", "c", "z"])


def _opt(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


def _mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a well-formed value, sometimes any JSON value at all."""
    return _weighted(good, _json)


def _chunks(
    mostly: Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]],
    number: st.SearchStrategy[Any],
) -> st.SearchStrategy[dict[str, Any]]:
    """Chunk objects; ``mostly`` and ``number`` say how often a known field is junk.
    Unknown fields (``extra``, ``vendor``) take any JSON value, poison included."""
    delta = _opt(
        role=mostly(st.sampled_from(["assistant", ""])),
        content=mostly(_text),
        reasoning=mostly(_text),
        tool_calls=mostly(
            st.lists(
                _opt(
                    index=number,
                    id=mostly(st.sampled_from(["t1", "t2"])),
                    function=_opt(name=mostly(_text), arguments=mostly(_text)),
                ),
                max_size=2,
            )
        ),
        audio=_opt(data=mostly(st.sampled_from(["AAAA", "not b64!"])), expires_at=number),
        annotations=st.lists(_json, max_size=2),
        extra=_json,
    )
    choice = st.fixed_dictionaries(
        {"index": number},
        optional={
            "delta": mostly(delta),
            "finish_reason": mostly(st.sampled_from(["stop", "length", "model_length"])),
            "logprobs": _opt(content=mostly(st.lists(_json, max_size=2))),
            "extra": _json,
        },
    )
    usage = _opt(
        prompt_tokens=number,
        completion_tokens=number,
        total_tokens=number,
        cost=number,
        prompt_tokens_details=mostly(_opt(cached_tokens=number)),
        completion_tokens_details=mostly(_opt(reasoning_tokens=number)),
    )
    optional: dict[str, st.SearchStrategy[Any]] = {
        "object": st.just("chat.completion.chunk"),
        "created": number,
        "model": mostly(st.sampled_from(["m1", "m2"])),
        "usage": mostly(usage),
        "system_fingerprint": mostly(st.just("fp")),
        "vendor": _json,
    }
    if mostly is _mostly:  # a provider error (status error) only in the junk kind
        optional["error"] = mostly(_opt(message=_text))
    return st.fixed_dictionaries(
        {"id": mostly(_ids), "choices": mostly(st.lists(choice, min_size=1, max_size=2))},
        optional=optional,
    )


_chunk_value = st.sampled_from(
    [_chunks(lambda good: good, _small)] * 3 + [_chunks(_mostly, _number)]
).flatmap(lambda strategy: strategy)
"""Three in four chunks have only well-formed known fields; the rest have some junk."""


def _encode(value: Any) -> bytes:
    text = json.dumps(value)  # NaN / Infinity literals for non-finite floats
    for i, literal in enumerate(_POISON):
        text = text.replace(json.dumps(f"{_MARK}{i}"), literal)
    return text.encode()


_values = st.one_of(
    _chunk_value.map(_encode),
    _chunk_value.map(_encode),
    _chunk_value.map(_encode),
    _json.map(_encode),
    st.binary(max_size=40),
)
_header_values = (
    st.binary(max_size=12)
    | st.integers(-3, 25).map(lambda i: str(i).encode())
    | st.integers(-(2**70), 2**70).map(lambda i: str(i).encode())
    | st.sampled_from(
        [b"", b"done", b"closed", b"aborted", b"\xff\xfe", b"1e3", b" 7", b"1760000000000"]
    )
)
_header_names = (
    st.sampled_from(
        ["cs-seq", "cs-end", "cs-end-reason", "cs-tenant", "cs-provider", "cs-started-at"]
    )
    | st.sampled_from(["cs-rerouted", "x-trace", "cs-"])
    | st.text(max_size=6)
)
_started = st.sampled_from([1_760_000_000_000, 10**30, 0, 1_760_000_000, 2**63])
_chunk_headers = st.builds(
    lambda seq, started, tenant: encode_headers(
        RecordMeta(seq=seq, started_at_ms=started, tenant=tenant)
    ),
    st.none() | st.integers(0, 14),
    st.none() | _started,
    st.none() | st.just("t"),
)
_end_headers = st.builds(
    lambda n, reason: encode_headers(RecordMeta(end_count=n, end_reason=reason)),
    st.integers(0, 14),
    st.none() | st.sampled_from(["done", "closed", "aborted"]),
)
_any_headers = st.lists(st.tuples(_header_names, _header_values), max_size=4)
_keys = st.one_of(
    _ids.map(str.encode),
    _ids.map(str.encode),
    st.none(),
    st.binary(max_size=6),
    st.just(b"k" * 1025),
)
_timestamps = st.none() | st.integers(-(2**63), 2**63 - 1) | st.just(1_760_000_000_000)
_partitions = st.integers(0, 1)
_records = st.one_of(
    st.tuples(_partitions, _keys, _values, _chunk_headers, _timestamps),
    st.tuples(_partitions, _keys, _values, _chunk_headers, _timestamps),
    st.tuples(_partitions, _keys, st.just(b""), _end_headers, _timestamps),  # end markers
    st.tuples(_partitions, _keys, _values | st.just(b""), _any_headers, _timestamps),
)


@st.composite
def _stream(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """The records of one sequenced stream as a publisher writes it (its chunks, maybe
    shuffled, duplicated or missing, values sometimes poisoned, then an end marker)."""
    partition, cid = draw(_partitions), draw(_ids)
    n = draw(st.integers(1, 6))
    started = draw(st.none() | _started)
    last = {"choices": [{"index": i, "delta": {}, "finish_reason": "stop"} for i in (0, 1)]}
    records: list[tuple[Any, ...]] = [
        (
            partition,
            cid.encode(),
            _encode(draw(_chunk_value) | {"id": cid} | (last if seq == n - 1 else {})),
            encode_headers(RecordMeta(seq=seq, started_at_ms=started)),
            1_760_000_000_000 + seq,
        )
        for seq in range(n)
    ]
    records = draw(st.permutations(records))
    records = records[: draw(st.integers(max(n - 2, 0), n))] + draw(
        st.lists(st.sampled_from(records), max_size=2)
    )
    end = encode_headers(
        RecordMeta(end_count=n, end_reason=draw(st.sampled_from(["done", "aborted"])))
    )
    if draw(st.booleans()):
        records.append((partition, cid.encode(), b"", end, 1_760_000_000_100))
    return records


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("records"), _records.map(lambda r: [r])),
        st.tuples(st.just("records"), _records.map(lambda r: [r])),
        st.tuples(st.just("records"), _stream()),
        st.tuples(st.just("records"), st.lists(_records, max_size=4)),
        st.tuples(st.just("fetched"), st.tuples(st.integers(0, 30), st.integers(0, 30))),
        st.tuples(st.just("tick"), st.floats(0, 2000)),
        st.tuples(st.just("flush"), st.none()),
    ),
    max_size=20,
)


_SETTINGS = Settings(
    idle_timeout_s=5,
    usage_grace_s=1,
    max_chunks=12,
    max_record_bytes=6000,
    max_response_bytes=1024,
    max_lifetime_s=600,
)
"""Small limits, so that the limit, oversize and too-large paths are taken too (built once:
a Settings object takes milliseconds)."""


class _TopicPartition(NamedTuple):
    topic: str
    partition: int


class _ConsumerRecord(NamedTuple):
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int | None


async def _run(ops: list[tuple[str, Any]], batched: bool) -> None:
    """``batched``: records arrive as fetched batches (``handle_batch``, acks through the
    acker: what the app does), else one by one (``handle`` with a release callback). Not
    mixed on one partition: ``release`` calls callbacks at once and the acker after its
    pass, so mixing the two would reorder acks within a pass."""
    acked: list[tuple[int, int]] = []
    send = FakeSend()
    now = [1000.0]
    stitcher = Stitcher(
        _SETTINGS,
        send,
        lambda: now[0],
        acker=lambda partition, offsets: acked.extend((partition, o) for o in offsets),
    )
    s = stitcher.settings
    for partition in (0, 1):
        part = stitcher.parts[partition] = _Partition(loaded=True)
        part.ledger["z"] = 10**6  # an emitted completion: its chunks are replays
    offsets = {0: 0, 1: 0}
    keys: dict[tuple[int, int], bytes | None] = {}
    emitted: list[tuple[int, int]] = []
    seal = stitcher.flush

    async def flush() -> None:  # also the flush that handle_batch seals its round with
        emitted.extend((e.partition, o) for e in stitcher._emit for o in e.stream.offsets)
        await seal()

    stitcher.flush = flush  # type: ignore[method-assign]

    def number(partition: int, key: bytes | None) -> int:
        offset = offsets[partition]
        offsets[partition] += 1
        keys[partition, offset] = key
        return offset

    ledgered: set[str] = set()  # every id a ledger held at some point: entries expire

    def note_ledgers() -> None:
        ledgered.update(cid for p in stitcher.parts.values() for cid in p.ledger)

    for op, arg in ops:
        note_ledgers()
        if op == "records" and not batched:  # one by one, each with a release callback
            for partition, key, value, headers, ts in arg:
                offset = number(partition, key)
                rec = Record(TOPIC, partition, offset, key, value, headers, ts)
                await stitcher.handle(rec, lambda p=partition, o=offset: acked.append((p, o)))
        elif op == "records":  # one fetch: a round per batch, acks through the acker
            by_partition: dict[int, list[_ConsumerRecord]] = {}
            for partition, key, value, headers, ts in arg:
                by_partition.setdefault(partition, []).append(
                    _ConsumerRecord(number(partition, key), key, value, headers, ts)
                )
            await stitcher.handle_batch(
                [(_TopicPartition(TOPIC, p), recs) for p, recs in by_partition.items()]
            )
        elif op == "fetched":  # high watermarks: a partition with lag is judged by event time
            stitcher.fetched({p: offsets[p] + extra for p, extra in enumerate(arg)})
        elif op == "tick":
            now[0] += arg
            stitcher.tick()
        else:
            await stitcher.flush()
    note_ledgers()
    stitcher.fetched(offsets)  # caught up: the wall-clock rules apply to every partition
    now[0] += s.max_lifetime_s + s.idle_timeout_s + 1
    stitcher.tick()
    await stitcher.flush()
    await stitcher.drain()

    # Nothing is left open or held; every record was acknowledged once, in offset order.
    assert not any(p.open or p.held for p in stitcher.parts.values())
    for partition, count in offsets.items():
        assert [o for p, o in acked if p == partition] == list(range(count))
    # Each record ended as exactly one of: part of a response, a dead letter, a re-route,
    # or a replay skip (a completion the ledger knows).
    letters = [DeadLetter.model_validate_json(v) for v in send.values(s.topic_deadletter)]
    assert [x for x in letters if x.reason == "internal_error"] == []
    lettered = [(x.source_partition, x.source_offset) for x in letters]
    rerouted = [
        tuple(int(n) for n in dict(h)["cs-rerouted"].decode().split("/")[1:])
        for t, _, _, h in send.sent
        if t == TOPIC
    ]
    note_ledgers()  # (a replay skip is judged by what the ledger knew, not what it still
    # knows after the last tick: the test's clock may run past emitted_memory_s)
    for record in keys:
        outcomes = emitted.count(record) + lettered.count(record) + rerouted.count(record)
        if outcomes == 0:
            key = keys[record]
            assert key is not None, record
            assert key.decode("utf-8", "replace") in ledgered, record
        else:
            assert outcomes == 1, record
    # Every response is strict JSON that the downstream schema and the usage fold accept.
    for body in send.values(s.topic_responses):
        assert len(body) <= s.max_response_bytes
        json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in a response"))
        contribution(ChatCompletion.model_validate_json(body))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_ops, st.booleans())
def test_no_input_makes_the_stitcher_raise_and_no_record_disappears(
    ops: list[tuple[str, Any]], batched: bool
) -> None:
    asyncio.run(_run(ops, batched))
