"""Publisher logic without a broker: values, keys, headers, end markers, tee helpers.

``RecordingPublisher`` replaces only the hand-off to aiokafka (``_put``) so the record
contract can be checked record by record; the Kafka path itself is covered by
tests/integration/test_clients_*.py on the real broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk as OpenAIChunk

from processor.clients import Publisher, PublishError, tee_chunks, tee_sse
from processor.clients._serialize import chunk_id, to_value
from processor.settings import Settings
from topics import decode_headers


class RecordingPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__(Settings(broker="127.0.0.1:9"))
        self.records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self._running = True

    async def _put(self, key: Any, value: bytes, headers: Any, seq: int | None) -> None:
        self.records.append((key, value, headers))


def _chunk(cid: str, content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


PLACEHOLDER = {"id": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}


# --- serialization ---------------------------------------------------------------------


def test_bytes_and_str_are_published_exactly_as_received() -> None:
    raw = b'{"id":"c1",  "choices":[] ,"weird":  1}'
    assert to_value(raw) is raw
    assert to_value(raw.decode()) == raw
    assert to_value(bytearray(raw)) == raw


def test_dict_keeps_its_keys_camel_or_snake() -> None:
    camel = {
        "id": "c1",
        "choices": [{"index": 0, "delta": {"toolCalls": []}}],
        "systemFingerprint": "x",
    }
    assert json.loads(to_value(camel)) == camel
    assert b"systemFingerprint" in to_value(camel)


def test_openai_chunk_object_serialized_snake_case_with_only_set_fields() -> None:
    obj = OpenAIChunk.model_validate(_chunk("c1", "hi"))
    value = json.loads(to_value(obj))
    assert value["id"] == "c1"
    assert value["choices"][0]["delta"] == {"content": "hi"}
    assert "system_fingerprint" not in value  # not set on the wire, not invented
    assert "usage" not in value


def test_unsupported_type_names_what_to_pass() -> None:
    with pytest.raises(TypeError, match="pass a dict, JSON bytes/str"):
        to_value(42)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (_chunk("c1"), "c1"),
        (json.dumps(_chunk("c2")), "c2"),
        (json.dumps(_chunk("c3")).encode(), "c3"),
        (OpenAIChunk.model_validate(_chunk("c4")), "c4"),
        (PLACEHOLDER, None),
        (b"not json", None),
        (b"[1,2]", None),
        ({"id": 5}, None),
    ],
)
def test_chunk_id(chunk: Any, expected: str | None) -> None:
    assert chunk_id(chunk, to_value(chunk)) == expected


# --- stream handle: key, seq, headers, end marker --------------------------------------


async def test_stream_numbers_chunks_sets_key_headers_and_end_marker() -> None:
    pub = RecordingPublisher()
    async with pub.stream(tenant="acme", provider="openai", request_started_at=1.5) as s:
        await s.send(_chunk("c1", "a"))
        await s.send(json.dumps(_chunk("c1", "b")))
        s.mark_done()
    assert [r[0] for r in pub.records] == [b"c1"] * 3
    metas = [decode_headers(r[2]) for r in pub.records]
    assert [m.seq for m in metas[:2]] == [0, 1]
    assert all(m.tenant == "acme" and m.provider == "openai" for m in metas)
    assert all(m.started_at_ms == 1500 for m in metas)
    end = metas[2]
    assert end.is_end_marker
    assert end.end_count == 2
    assert end.end_reason == "done"
    assert pub.records[2][1] == b""
    assert pub.stats.chunks == 2
    assert pub.stats.streams == 1


async def test_end_reason_closed_without_done() -> None:
    pub = RecordingPublisher()
    async with pub.stream() as s:
        await s.send(_chunk("c1", "a"))
    end = decode_headers(pub.records[-1][2])
    assert end.end_reason == "closed"
    assert end.end_count == 1
    assert decode_headers(pub.records[0][2]).tenant is None


async def test_body_raising_sends_aborted_marker_and_reraises() -> None:
    pub = RecordingPublisher()

    async def body() -> None:
        async with pub.stream() as s:
            await s.send(_chunk("c1", "a"))
            raise RuntimeError("gateway bug")

    with pytest.raises(RuntimeError, match="gateway bug"):
        await body()
    end = decode_headers(pub.records[-1][2])
    assert end.end_reason == "aborted"
    assert end.end_count == 1
    assert pub.records[-1][0] == b"c1"


async def test_azure_placeholder_never_becomes_the_key() -> None:
    pub = RecordingPublisher()
    async with pub.stream() as s:
        await s.send(PLACEHOLDER)
        assert pub.records == []  # held until the id is known
        await s.send(_chunk("c9", "x"))
    assert [r[0] for r in pub.records] == [b"c9", b"c9", b"c9"]
    assert json.loads(pub.records[0][1])["prompt_filter_results"]
    assert [decode_headers(r[2]).seq for r in pub.records[:2]] == [0, 1]
    assert decode_headers(pub.records[2][2]).end_count == 2


async def test_explicit_completion_id_keys_idless_chunks() -> None:
    pub = RecordingPublisher()
    async with pub.stream(completion_id="given") as s:
        await s.send({"choices": []})
    assert [r[0] for r in pub.records] == [b"given", b"given"]


async def test_stream_that_never_gets_an_id_is_published_keyless_not_dropped() -> None:
    pub = RecordingPublisher()
    async with pub.stream() as s:
        await s.send(PLACEHOLDER)
    assert len(pub.records) == 1
    assert pub.records[0][0] is None


async def test_send_after_close_is_an_error() -> None:
    pub = RecordingPublisher()
    async with pub.stream() as s:
        await s.send(_chunk("c1"))
    with pytest.raises(PublishError, match="closed"):
        await s.send(_chunk("c1"))


async def test_unstarted_publisher_says_how_to_start() -> None:
    pub = Publisher(Settings(broker="127.0.0.1:9"))
    with pytest.raises(PublishError, match="async with Publisher"):
        await pub.stream().send(_chunk("c1"))


# --- tee helpers -------------------------------------------------------------------------


async def test_tee_sse_yields_bytes_unchanged_and_publishes_each_data_line_once() -> None:
    events = [
        b": keep-alive\n\n",
        *[f"data: {json.dumps(_chunk('s1', w))}\n\n".encode() for w in ("he", "llo")],
        b"event: ping\n\n",
        b"data: [DONE]\n\n",
    ]
    wire = b"".join(events)
    pieces = [wire[i : i + 7] for i in range(0, len(wire), 7)]  # splits inside lines

    async def source() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    pub = RecordingPublisher()
    out = [raw async for raw in tee_sse(source(), pub.stream())]
    assert out == pieces
    chunks = [r for r in pub.records if r[1]]
    assert [json.loads(r[1])["choices"][0]["delta"]["content"] for r in chunks] == ["he", "llo"]
    assert decode_headers(pub.records[-1][2]).end_reason == "done"


async def test_tee_sse_uses_aiter_bytes_of_an_httpx_like_response() -> None:
    class Response:
        async def aiter_bytes(self) -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(_chunk('h1', 'x'))}".encode()  # no trailing newline

    pub = RecordingPublisher()
    out = [raw async for raw in tee_sse(Response(), pub.stream())]
    assert len(out) == 1
    assert pub.records[0][0] == b"h1"
    assert decode_headers(pub.records[-1][2]).end_reason == "closed"


async def test_tee_chunks_yields_the_same_openai_objects() -> None:
    objs = [OpenAIChunk.model_validate(_chunk("o1", w)) for w in ("a", "b")]

    async def source() -> AsyncIterator[OpenAIChunk]:
        for obj in objs:
            yield obj

    pub = RecordingPublisher()
    out = [c async for c in tee_chunks(source(), pub.stream(provider="openai"))]
    assert all(a is b for a, b in zip(out, objs, strict=True))
    assert len(pub.records) == 3
    assert pub.records[-1][1] == b""


async def test_tee_marks_aborted_when_the_upstream_fails() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield f"data: {json.dumps(_chunk('f1', 'a'))}\n\n".encode()
        raise ConnectionError("upstream reset")

    pub = RecordingPublisher()
    with pytest.raises(ConnectionError):
        async for _ in tee_sse(source(), pub.stream()):
            pass
    assert decode_headers(pub.records[-1][2]).end_reason == "aborted"


async def test_tee_marks_aborted_when_the_client_goes_away() -> None:
    gate = asyncio.Event()
    sent_first = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield f"data: {json.dumps(_chunk('g1', 'a'))}\n\n".encode()
        sent_first.set()
        await gate.wait()
        yield b""

    pub = RecordingPublisher()

    async def relay() -> None:
        async for _ in tee_sse(source(), pub.stream()):
            pass

    task = asyncio.create_task(relay())
    await sent_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert decode_headers(pub.records[-1][2]).end_reason == "aborted"


async def test_tee_keeps_passing_bytes_through_when_publishing_fails() -> None:
    class FailingPublisher(RecordingPublisher):
        async def _put(self, key: Any, value: bytes, headers: Any, seq: int | None) -> None:
            raise PublishError("broker gone")

    wire = [f"data: {json.dumps(_chunk('p1', w))}\n\n".encode() for w in ("a", "b")]

    async def source() -> AsyncIterator[bytes]:
        for piece in wire:
            yield piece

    out = [raw async for raw in tee_sse(source(), FailingPublisher().stream())]
    assert out == wire


async def test_request_started_at_accepts_a_datetime() -> None:
    from datetime import UTC, datetime

    pub = RecordingPublisher()
    started = datetime(2024, 1, 1, tzinfo=UTC)
    async with pub.stream(request_started_at=started) as s:
        await s.send(_chunk("d1"))
    assert decode_headers(pub.records[0][2]).started_at_ms == int(started.timestamp() * 1000)


async def test_tee_chunks_of_sse_data_strings_ends_at_done_and_skips_keep_alives() -> None:
    """Issue 15: httpx-sse's ``aiter_sse()`` data strings passed to tee_chunks published
    "[DONE]" as a chunk (a not_json dead letter, and the worker waited for it)."""
    data = [json.dumps(_chunk("d1", w)) for w in ("a", "b")]
    items = ["", data[0], "  ", data[1], json.dumps(_chunk("d1", finish="stop")), "[DONE]"]

    async def source() -> AsyncIterator[str]:
        for item in items:
            yield item

    pub = RecordingPublisher()
    out = [x async for x in tee_chunks(source(), pub.stream())]
    assert out == items  # passed through unchanged, sentinel and keep-alives included
    *chunks, end = pub.records
    assert [json.loads(v) for _, v, _ in chunks] == [json.loads(x) for x in items[1:5] if x.strip()]
    meta = decode_headers(end[2])
    assert (meta.end_reason, meta.end_count) == ("done", 3)


async def test_tee_chunks_sends_the_end_marker_at_done_not_when_the_connection_closes() -> None:
    class Event:  # the shape of httpx_sse.ServerSentEvent
        def __init__(self, data: str) -> None:
            self.event, self.data, self.id, self.retry = "message", data, "", None

    pub = RecordingPublisher()
    after_done: list[int] = []

    async def source() -> AsyncIterator[Event]:
        yield Event(json.dumps(_chunk("e1", "x", finish="stop")))
        yield Event("[DONE]")
        after_done.append(len(pub.records))  # the upstream keeps the connection open
        yield Event(json.dumps(_chunk("e1", "late")))

    out = [e async for e in tee_chunks(source(), pub.stream())]
    assert len(out) == 3
    assert after_done == [2]  # chunk + end marker already published
    assert len(pub.records) == 2  # data after [DONE] is passed through, not published
    assert decode_headers(pub.records[-1][2]).end_reason == "done"


# --- the example gateway's usage handling -------------------------------------------------


def test_gateway_asks_for_usage_only_when_the_client_did_not_say() -> None:
    from examples.gateway import _ask_for_usage

    body, strip = _ask_for_usage(b'{"stream": true, "messages": []}')
    assert strip is True
    assert json.loads(body)["stream_options"] == {"include_usage": True}
    for unchanged in (
        b'{"stream": true, "stream_options": {"include_usage": false}}',  # the client said
        b'{"stream": true, "stream_options": {"include_usage": true}}',
        b'{"stream": false}',
        b"not json",
    ):
        assert _ask_for_usage(unchanged) == (unchanged, False)


async def test_gateway_drops_only_the_usage_only_event_wherever_the_bytes_are_cut() -> None:
    from examples.gateway import _without_usage_chunk

    events = [
        b": keep-alive\n\n",
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n',
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1}}\r\n\r\n',
        b"data: [DONE]\n\n",
    ]
    wire = b"".join(events)
    for size in (1, 5, 17, len(wire)):

        async def source(n: int = size) -> AsyncIterator[bytes]:
            for i in range(0, len(wire), n):
                yield wire[i : i + n]

        out = b"".join([piece async for piece in _without_usage_chunk(source())])
        assert out == events[0] + events[1] + events[3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user": "a\nb"}, "user must be printable"),
        ({"user": "x" * 257}, "user is longer than 256 bytes"),
        ({"attributes": {"Feature": "x"}}, "attribute name 'Feature' must be"),
        ({"attributes": {"api-key": "x"}}, "attribute name 'api-key' must be"),
        ({"attributes": {"env": "\x00"}}, "attribute 'env' must be printable"),
        ({"attributes": {f"a{i}": "x" for i in range(17)}}, "at most 16 per stream"),
    ],
)
def test_bad_user_or_attribute_is_one_line_value_error(
    kwargs: dict[str, Any], message: str
) -> None:
    from processor.clients._publisher import stream_headers

    with pytest.raises(ValueError, match=message) as info:
        stream_headers(tenant=None, provider=None, request_started_at=None, **kwargs)
    assert "\n" not in str(info.value)


def test_user_and_attributes_become_headers() -> None:
    from processor.clients._publisher import stream_headers

    headers = stream_headers(
        tenant="t",
        provider=None,
        request_started_at=None,
        user="alice",
        attributes={"feature": "search", "env": "prod"},
    )
    assert headers == [
        ("cs-tenant", b"t"),
        ("cs-user", b"alice"),
        ("cs-attr-env", b"prod"),
        ("cs-attr-feature", b"search"),
    ]
