"""Tee helpers: pass a stream through to the gateway's client unchanged, publishing it.

Both helpers yield exactly the objects they received, in order, and publish each chunk
through a :class:`StreamHandle`. The end-of-stream marker is sent when the source ends
(``done`` after ``[DONE]``, otherwise ``closed``) or when iteration fails or is cancelled
(``aborted``; the error is re-raised).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Protocol, TypeVar

from processor.clients._publisher import StreamHandle
from processor.core import ChunkLineDecoder, Payload

__all__ = ["tee_chunks", "tee_sse"]

T = TypeVar("T")


class _ByteStream(Protocol):
    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


async def tee_chunks(source: AsyncIterable[T], stream: StreamHandle) -> AsyncGenerator[T, None]:
    """Yield every item of ``source`` (openai SDK ``ChatCompletionChunk`` objects, dicts,
    JSON strings) unchanged, publishing each one on ``stream``."""
    async with stream:
        async for chunk in source:
            await stream.send(chunk)
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
    async with stream:
        async for raw in iterable:
            await _publish(decoder.decode(raw), stream)
            yield raw
        await _publish(decoder.flush(), stream)


async def _publish(payloads: list[Payload], stream: StreamHandle) -> None:
    for payload in payloads:
        if payload.done:
            stream.mark_done()
        elif payload.error is None:
            await stream.send(payload.data)
