"""Validation of one raw chunk: accept everything usable, reject with a reason that names
the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from topics._chunk import (
    AudioDelta,
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    ChunkLogprobs,
    ChunkUsage,
    FunctionDelta,
)

__all__ = ["ChunkRejected", "is_placeholder", "parse_chunk"]


class ChunkRejected(ValueError):
    """A record is not a usable chunk. ``reason`` is a short code, ``field`` the culprit."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


_FIELD_NAMES: frozenset[str] = frozenset(
    name
    for model in (
        ChatCompletionChunk,
        ChunkChoice,
        ChunkDelta,
        ChunkLogprobs,
        ChunkUsage,
        FunctionDelta,
        AudioDelta,
    )
    for field_name, info in model.model_fields.items()
    for name in (
        field_name,
        *(getattr(info.validation_alias, "choices", None) or ()),
    )
)
"""Every known field name (snake_case and camelCase): a part of an error location that is
not one of them is a union member's tag (``str``, ``constrained-int``), not a field."""


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
    return out


def parse_chunk(data: bytes | bytearray | str | dict[str, Any]) -> ChatCompletionChunk:
    """Validate one ``chat.completion.chunk`` (JSON bytes/str or a dict).

    Rejected (:class:`ChunkRejected`) only when it is not JSON, not an object, has wrongly
    typed known fields (a known number that is non-finite, negative or out of range is
    wrongly typed: reason ``wrong_type``), or has no usable ``id`` and no choices and no
    usage.
    """
    try:
        if isinstance(data, dict):
            chunk = ChatCompletionChunk.model_validate(data)
        else:
            chunk = ChatCompletionChunk.model_validate_json(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        kind = err["type"]
        if kind == "json_invalid":
            raise ChunkRejected("not_json", f"not valid JSON: {err['msg']}") from None
        if not err["loc"]:
            raise ChunkRejected(
                "not_an_object", 'a chunk must be a JSON object like {"id": ..., "choices": [...]}'
            ) from None
        field = _loc(err["loc"])
        inner = (err.get("ctx") or {}).get("field")
        if inner:  # a range check of a number inside usage (cost, cached_tokens, ...)
            field = f"{field}.{inner}"
        raise ChunkRejected(
            "wrong_type",
            f"field '{field}' is invalid: {err['msg']}; fix the producer of this chunk",
            field,
        ) from None
    if not chunk.id and not chunk.choices and chunk.usage is None and not is_placeholder(chunk):
        raise ChunkRejected(
            "no_id",
            "field 'id' is missing or empty and the chunk has no choices and no usage",
            "id",
        )
    return chunk


def is_placeholder(chunk: ChatCompletionChunk) -> bool:
    """Azure's leading chunk: ``id: ""``, no choices, only ``prompt_filter_results``.

    It belongs to the completion that follows it and is never a completion of its own.
    """
    extra = chunk.model_extra or {}
    return not chunk.id and not chunk.choices and "prompt_filter_results" in extra
