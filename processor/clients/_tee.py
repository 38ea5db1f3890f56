"""Tee helpers: pass a stream through to the gateway's client unchanged, publishing it.

Both helpers yield exactly the objects they received, in order, and publish each chunk
through a :class:`StreamHandle`. The end-of-stream marker is sent when the source ends
(``done`` after ``[DONE]``, otherwise ``closed``) or when iteration fails or is cancelled
(``aborted``; the error is re-raised).

Publishing never breaks the pass-through: a chunk the publisher cannot take is counted
and reported by the publisher (error callback, ``stats.failed``, log), and the gateway's
client still receives every byte.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from types import TracebackType
from typing import Any, Protocol, TypeVar

from processor.clients._errors import PublishError
from processor.clients._publisher import StreamHandle
from processor.core import ChunkLineDecoder, Payload
from processor.logs import get_logger

__all__ = ["tee_chunks", "tee_sse"]

log = get_logger(__name__)

T = TypeVar("T")


class _ByteStream(Protocol):
    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


class _Guard:
    """``async with`` over a stream handle that never lets a publish error escape."""

    def __init__(self, stream: StreamHandle) -> None:
        self.stream = stream

    async def send(self, chunk: Any) -> None:
        try:
            await self.stream.send(chunk)
        except PublishError as exc:  # already counted and reported by the publisher
            log.warning(
                "tee_publish_failed", completion_id=self.stream.completion_id, error=str(exc)
            )

    async def __aenter__(self) -> _Guard:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stream.__aexit__(et, ev, tb)
        except PublishError as exc:
            log.warning(
                "tee_publish_failed", completion_id=self.stream.completion_id, error=str(exc)
            )


async def tee_chunks(source: AsyncIterable[T], stream: StreamHandle) -> AsyncGenerator[T, None]:
    """Yield every item of ``source`` (openai SDK ``ChatCompletionChunk`` objects, dicts,
    JSON strings) unchanged, publishing each one on ``stream``."""
    async with _Guard(stream) as guard:
        async for chunk in source:
            await guard.send(chunk)
            yield chunk


async def tee_sse(
    source: _ByteStream | AsyncIterable[bytes], stream: StreamHandle
) -> AsyncGenerator[bytes, None]:
    """Yield the raw bytes of an SSE response unchanged, publishing every ``data:`` chunk.

    ``source`` is an httpx streaming response (its ``aiter_bytes()`` is used) or any async
    iterable of bytes. The bytes are split into SSE lines with the core's incremental
    decoder, so a chunk split across network reads is published once, whole. Lines that
    are not chunks (comments, ``event:``) are passed through and not published.
    """
    iterable: AsyncIterable[bytes]
    iterable = source.aiter_bytes() if hasattr(source, "aiter_bytes") else source
    decoder = ChunkLineDecoder()
    async with _Guard(stream) as guard:
        async for raw in iterable:
            await _publish(decoder.decode(raw), guard)
            yield raw
        await _publish(decoder.flush(), guard)


async def _publish(payloads: list[Payload], guard: _Guard) -> None:
    for payload in payloads:
        if payload.done:
            guard.stream.mark_done()
        elif payload.error is None:
            await guard.send(payload.data)
