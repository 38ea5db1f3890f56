from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from processor.core import ChunkLineDecoder, Payload

SSE = (
    b": keep-alive\n\n"
    b'data: {"id":"a","choices":[]}\r\n\r\n'
    b"event: message\n"
    b'data:{"id":"b","choices":[{"index":0,"delta":{"content":"\xc3\xa9"}}]}\n\n'
    b"oops not json\n"
    b"data: [DONE]\n"
)


def _all(parts: list[bytes]) -> list[Payload]:
    dec = ChunkLineDecoder()
    out: list[Payload] = []
    for part in parts:
        out.extend(dec.decode(part))
    out.extend(dec.flush())
    return out


def test_sse_capture_classified() -> None:
    items = _all([SSE])
    assert [(p.lineno, p.done, p.error is not None) for p in items] == [
        (3, False, False),
        (6, False, False),
        (8, False, True),
        (9, True, False),
    ]
    assert items[0].data == b'{"id":"a","choices":[]}'
    assert "oops" in (items[2].error or "")


def test_json_lines_and_last_line_without_newline() -> None:
    items = _all([b'{"id":"a"}\n\n{"id":"b"}'])
    assert [p.data for p in items] == [b'{"id":"a"}', b'{"id":"b"}']
    assert [p.lineno for p in items] == [1, 3]


@given(cuts=st.lists(st.integers(0, len(SSE)), max_size=12))
def test_split_anywhere_gives_the_same_payloads(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    parts = [SSE[a:b] for a, b in zip([0, *points], [*points, len(SSE)], strict=True)]
    assert _all(parts) == _all([SSE])


def _all_chunks(parts: list[bytes]) -> list[Payload]:
    dec = ChunkLineDecoder()
    out: list[Payload] = []
    for part in [*(dec.decode_chunks(p) for p in parts), dec.flush_chunks()]:
        out.extend(x if isinstance(x, Payload) else Payload(x[0], x[1]) for x in part)
    return out


JSONL = b'{"id":"a"}\n  {"id":"b"}  \r\n\n{"id":"c"}\r\n' + SSE + b'{"id":"d"}'


@given(cuts=st.lists(st.integers(0, len(JSONL)), max_size=12))
def test_fast_path_gives_the_same_payloads_as_decode(cuts: list[int]) -> None:
    """decode_chunks (the assembler's fast path: no Payload per chunk line) and decode
    agree on every line, wherever the input is cut."""
    points = sorted(set(cuts))
    parts = [JSONL[a:b] for a, b in zip([0, *points], [*points, len(JSONL)], strict=True)]
    assert _all_chunks(parts) == _all([JSONL])
    assert [p.data for p in _all([JSONL]) if not p.done and p.error is None][:3] == [
        b'{"id":"a"}',
        b'{"id":"b"}',
        b'{"id":"c"}',
    ]
