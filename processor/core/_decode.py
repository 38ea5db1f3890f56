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

__all__ = ["Chunk", "ChunkLineDecoder", "Payload"]

_SSE_FIELDS = (b"event:", b"id:", b"retry:")


@dataclass(frozen=True, slots=True)
class Payload:
    """One meaningful line of a capture."""

    lineno: int
    data: bytes = b""
    done: bool = False
    error: str | None = None


Chunk = tuple[int, bytes]
"""``(line number, JSON payload)``: a chunk line as :meth:`ChunkLineDecoder.decode_chunks`
gives it (no :class:`Payload` object on this path)."""


class ChunkLineDecoder:
    """Split a byte stream into lines and classify them (see module docs)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lineno = 0

    def decode(self, data: bytes) -> list[Payload]:
        """Payloads of every line completed by ``data``."""
        return [
            item if type(item) is Payload else Payload(item[0], item[1])  # type: ignore[index]
            for item in self.decode_chunks(data)
        ]

    def flush(self) -> list[Payload]:
        """The payload of a last line without a trailing newline, if any."""
        return [
            item if type(item) is Payload else Payload(item[0], item[1])  # type: ignore[index]
            for item in self.flush_chunks()
        ]

    def decode_chunks(self, data: bytes) -> list[Chunk | Payload]:
        """Like :meth:`decode`, for bulk readers (``chunkstitch assemble``): a chunk line is
        a ``(lineno, payload)`` tuple, only ``[DONE]`` and unusable lines are
        :class:`Payload` objects. A line that starts with ``{`` (or ``data: {``) and ends
        with ``}`` takes a fast path; the payloads are the same as :meth:`decode`'s."""
        buf = self._buffer
        buf += data
        cut = buf.rfind(b"\n")
        if cut < 0:
            return []
        lines = bytes(buf[:cut]).split(b"\n")
        del buf[: cut + 1]
        return self._lines(lines)

    def flush_chunks(self) -> list[Chunk | Payload]:
        """:meth:`flush` in the form of :meth:`decode_chunks`."""
        if not self._buffer:
            return []
        line = bytes(self._buffer)
        self._buffer.clear()
        return self._lines([line])

    def _lines(self, lines: list[bytes]) -> list[Chunk | Payload]:
        out: list[Chunk | Payload] = []
        append = out.append
        lineno = self._lineno
        self._lineno = lineno + len(lines)
        classify = self._line
        for line in lines:
            lineno += 1
            head = line[:1]
            if head == b"{" and line[-1:] == b"}":
                append((lineno, line))  # JSON Lines: the common case
            elif head == b"d" and line[-1:] == b"}" and line.startswith(b"data: {"):
                append((lineno, line[6:]))  # SSE data line
            else:
                item = classify(lineno, line)
                if item is not None:
                    append(item)
        return out

    @staticmethod
    def _line(lineno: int, raw: bytes) -> Chunk | Payload | None:
        line = raw.rstrip(b"\r").strip()
        if not line or line.startswith(b":"):
            return None
        if line.startswith(b"data:"):
            body = line[5:].strip()
            if body == b"[DONE]":
                return Payload(lineno, done=True)
            if not body:
                return None
            return (lineno, body)
        if line.startswith(_SSE_FIELDS):
            return None
        if line.startswith((b"{", b"[", b'"')) or line[:1].isdigit():
            return (lineno, line)
        preview = line[:60].decode("utf-8", "replace")
        return Payload(
            lineno,
            line,
            error=f"not a JSON line nor an SSE 'data:' line: {preview!r}",
        )
