"""Chunk values as they go on the wire: bytes as received, other shapes serialized once."""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["chunk_id", "to_value"]


def to_value(chunk: Any) -> bytes:
    """The record value of ``chunk``.

    * ``bytes``/``bytearray``/``memoryview``: unchanged (the provider's exact bytes);
    * ``str``: UTF-8 encoded, otherwise unchanged;
    * ``dict``: compact JSON, keys as given (snake_case or camelCase), UTF-8 (serialized
      with orjson: 0.3 us instead of json.dumps' 4-5 us for a typical chunk; a dict orjson
      cannot take, such as an integer beyond 64 bits, goes through json.dumps as before;
      non-finite floats, invalid JSON to begin with, become ``null``);
    * an object with ``model_dump_json``/``model_dump`` (openai-python
      ``ChatCompletionChunk``, any pydantic model): its snake_case JSON with only the fields
      that were set, so a chunk parsed from the wire keeps the wire's fields.
    """
    kind = type(chunk)
    if kind is bytes:
        return chunk  # type: ignore[no-any-return]
    if kind is dict:
        return _dumps(chunk)
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode()
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    if isinstance(chunk, dict):
        return _dumps(chunk)
    dump_json = getattr(chunk, "model_dump_json", None)
    if dump_json is not None:
        text = dump_json(exclude_unset=True)
        return text.encode() if isinstance(text, str) else bytes(text)
    dump = getattr(chunk, "model_dump", None)
    if dump is not None:
        return _dumps(dump())
    raise TypeError(
        f"cannot publish a {type(chunk).__name__}: pass a dict, JSON bytes/str, "
        f"or an object with model_dump() (an openai ChatCompletionChunk)"
    )


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError: e.g. an int beyond 64 bits
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def chunk_id(chunk: Any, value: bytes) -> str | None:
    """The completion id of ``chunk`` (``None`` when absent, empty or unreadable).

    Only used until a stream's id is known, so parsing bytes here is off the hot path.
    """
    if isinstance(chunk, dict):
        raw = chunk.get("id")
    elif isinstance(chunk, bytes | str | bytearray | memoryview):
        try:
            obj = orjson.loads(value)
        except ValueError:  # orjson.JSONDecodeError
            return None
        raw = obj.get("id") if isinstance(obj, dict) else None
    else:
        raw = getattr(chunk, "id", None)
    return raw if isinstance(raw, str) and raw else None
