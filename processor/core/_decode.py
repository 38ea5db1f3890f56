"""Incremental decoder for chunk captures: JSON Lines or raw Server-Sent Events.

Feed bytes as they arrive with :meth:`ChunkLineDecoder.decode` (a chunk of input may end
anywhere, even inside a UTF-8 character) and call :meth:`ChunkLineDecoder.flush` at the
end. Each complete line becomes at most one :class:`Payload`:

* ``data: {...}``  SSE data line -> the JSON payload (every LLM provider sends one JSON
  object per data line); ``data: [DONE]`` -> ``done=True``;
* ``: keep-alive``  SSE comment, ``event:`` / ``id:`` / ``retry:`` fields, blank lines -> nothing;
* ``{...}``         a JSON Lines record -> the payload;
* anything else    -> a payload with ``error`` set (the caller reports it with its line number).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChunkLineDecoder", "Payload"]

_SSE_FIELDS = (b"event:", b"id:", b"retry:")


@dataclass(frozen=True, slots=True)
class Payload:
    """One meaningful line of a capture."""

    lineno: int
    data: bytes = b""
    done: bool = False
    error: str | None = None


class ChunkLineDecoder:
    """Split a byte stream into lines and classify them (see module docs)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lineno = 0

    def decode(self, data: bytes) -> list[Payload]:
        """Payloads of every line completed by ``data``."""
        self._buffer += data
        out: list[Payload] = []
        start = 0
        buf = self._buffer
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            payload = self._line(bytes(buf[start:end]))
            if payload is not None:
                out.append(payload)
            start = end + 1
        del buf[:start]
        return out

    def flush(self) -> list[Payload]:
        """The payload of a last line without a trailing newline, if any."""
        if not self._buffer:
            return []
        line = bytes(self._buffer)
        self._buffer.clear()
        payload = self._line(line)
        return [payload] if payload is not None else []

    def _line(self, raw: bytes) -> Payload | None:
        self._lineno += 1
        line = raw.rstrip(b"\r").strip()
        if not line or line.startswith(b":"):
            return None
        if line.startswith(b"data:"):
            body = line[5:].strip()
            if body == b"[DONE]":
                return Payload(self._lineno, done=True)
            if not body:
                return None
            return Payload(self._lineno, body)
        if line.startswith(_SSE_FIELDS):
            return None
        if line.startswith((b"{", b"[", b'"')) or line[:1].isdigit():
            return Payload(self._lineno, line)
        preview = line[:60].decode("utf-8", "replace")
        return Payload(
            self._lineno,
            line,
            error=f"not a JSON line nor an SSE 'data:' line: {preview!r}",
        )
