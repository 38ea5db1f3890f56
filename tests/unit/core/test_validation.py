"""Range checks at validation: non-finite, negative and out-of-range numbers in known
fields are rejected (``wrong_type``, naming the field); unknown fields are kept as sent."""

from __future__ import annotations

import json

import pytest

from processor.core import Assembler, ChunkRejected, parse_chunk
from topics._chunk import MAX_CHOICE_INDEX, MAX_COUNT
from topics._headers import (
    STARTED_AT_EARLIEST_MS,
    STARTED_AT_LATEST_MS,
    STARTED_AT_MAX_AHEAD_MS,
    plausible_started_at,
)

_HUGE = "1" + "0" * 30


def _choice(index: str) -> bytes:
    return f'{{"id": "c", "choices": [{{"index": {index}, "delta": {{}}}}]}}'.encode()


def _usage(body: str) -> bytes:
    return f'{{"id": "c", "choices": [], "usage": {body}}}'.encode()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_choice("1e999"), "choices[0].index"),
        (_choice("-1e999"), "choices[0].index"),
        (_choice("NaN"), "choices[0].index"),
        (_choice("Infinity"), "choices[0].index"),
        (_choice("-1"), "choices[0].index"),
        (_choice("-0.5"), "choices[0].index"),
        (_choice(_HUGE), "choices[0].index"),
        (_choice(str(MAX_CHOICE_INDEX + 1)), "choices[0].index"),
        (b'{"id": "c", "created": 1e999, "choices": []}', "created"),
        (b'{"id": "c", "created": NaN, "choices": []}', "created"),
        (b'{"id": "c", "created": -1, "choices": []}', "created"),
        (f'{{"id": "c", "created": {_HUGE}, "choices": []}}'.encode(), "created"),
        (_usage('{"prompt_tokens": -1}'), "usage.prompt_tokens"),
        (_usage('{"completion_tokens": 1e999}'), "usage.completion_tokens"),
        (_usage('{"completionTokens": NaN}'), "usage.completionTokens"),
        (_usage(f'{{"total_tokens": {_HUGE}}}'), "usage.total_tokens"),
        (_usage(f'{{"total_tokens": {MAX_COUNT + 1}}}'), "usage.total_tokens"),
        (_usage('{"cost": 1e308}'), "usage.cost"),
        (_usage('{"cost": -0.01}'), "usage.cost"),
        (_usage('{"prompt_tokens_details": {"cached_tokens": -3}}'), "usage.prompt_tokens_details"),
        (
            _usage(f'{{"completionTokensDetails": {{"reasoningTokens": {_HUGE}}}}}'),
            "usage.completion_tokens_details.reasoningTokens",
        ),
        (
            b'{"id": "c", "choices": [{"index": 0, "delta": {"audio": {"expires_at": 1e999}}}]}',
            "choices[0].delta.audio.expires_at",
        ),
    ],
)
def test_a_non_finite_or_out_of_range_known_number_is_rejected_naming_the_field(
    raw: bytes, field: str
) -> None:
    with pytest.raises(ChunkRejected) as info:
        parse_chunk(raw)
    assert info.value.reason == "wrong_type"
    assert info.value.field is not None
    assert info.value.field.startswith(field)
    assert f"field '{info.value.field}'" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        _choice("0"),
        _choice("7881.03"),  # provider SDK examples send float indexes
        _choice(str(MAX_CHOICE_INDEX)),
        b'{"id": "c", "created": 6771.54, "choices": []}',
        b'{"id": "c", "created": 0, "choices": []}',
        _usage('{"prompt_tokens": 5.0, "total_tokens": 0}'),
        _usage('{"cost": 0.0012, "is_byok": false}'),
        _usage('{"cost": "0.0012"}'),  # not a number: kept as sent, ignored by the fold
        _usage('{"prompt_tokens_details": {"cached_tokens": null, "audio_tokens": 2}}'),
        b'{"id": "c", "choices": [], "vendor_extra": NaN, "other": 1e999}',
    ],
)
def test_valid_or_unknown_numbers_are_accepted(raw: bytes) -> None:
    parse_chunk(raw)


def test_an_error_location_names_the_field_not_the_union_member() -> None:
    with pytest.raises(ChunkRejected) as info:
        parse_chunk(b'{"id": "c", "choices": [{"index": 0, "delta": {"content": 5}}]}')
    assert info.value.field == "choices[0].delta.content"


def test_non_finite_unknown_fields_never_reach_the_output_as_invalid_json() -> None:
    asm = Assembler("c")
    asm.add(
        parse_chunk(b'{"id": "c", "x": NaN, "choices": [{"index": 0, "delta": {}, "y": 1e999}]}')
    )
    body = json.loads(asm.finish().to_json())  # strict JSON: no NaN / Infinity literals
    assert body["x"] is None
    assert body["choices"][0]["y"] is None


@pytest.mark.parametrize(
    ("started", "record_ts", "ok"),
    [
        (1_760_000_000_000, 1_760_000_000_500, True),
        (1_760_000_000_000, None, True),
        (STARTED_AT_EARLIEST_MS, None, True),
        (STARTED_AT_EARLIEST_MS - 1, None, False),
        (1_760_000_000, 1_760_000_000_000, False),  # seconds where milliseconds belong
        (0, 1_760_000_000_000, False),
        (1_760_000_000_000 + STARTED_AT_MAX_AHEAD_MS, 1_760_000_000_000, True),
        (1_760_000_000_001 + STARTED_AT_MAX_AHEAD_MS, 1_760_000_000_000, False),
        (10**30, 1_760_000_000_000, False),
        (10**30, None, False),
        (STARTED_AT_LATEST_MS, None, True),
        (STARTED_AT_LATEST_MS + 1, None, False),
        (1_000_000_000_000, 1_760_000_000_000, True),  # long before its record: still a start
    ],
)
def test_plausible_started_at(started: int, record_ts: int | None, ok: bool) -> None:
    assert plausible_started_at(started, record_ts) is ok
