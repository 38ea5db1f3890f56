"""Tee helpers: pass a stream through to the gateway's client unchanged, publishing it.

Every helper yields exactly the objects it received, in order, and publishes each chunk
through a stream handle. The end-of-stream marker is sent as soon as the upstream's
``[DONE]`` arrives (reason ``done``), otherwise when the source ends (``closed``), or when
iteration fails or is cancelled (``aborted``; the error is re-raised).

What is a chunk: ``tee_sse`` splits raw SSE bytes with the core's decoder. ``tee_chunks``
takes chunk objects (openai SDK ``ChatCompletionChunk``, dicts, JSON bytes/str) and also
the ``data`` strings of an SSE client such as httpx-sse's ``aiter_sse()`` (or its
``ServerSentEvent`` objects): the ``[DONE]`` sentinel ends the stream and is never
published as a chunk; empty data (keep-alives) is passed through and not published.

Publishing never breaks the pass-through: a chunk the publisher cannot take is counted
and reported by the publisher (error callback, ``stats.failed``, log), and the gateway's
client still receives every byte.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Generator, Iterable
from collections.abc import Iterator as SyncIterator
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

from processor.clients._errors import PublishError
from processor.clients._publisher import StreamHandle
from processor.clients._sync import SyncStreamHandle
from processor.core import ChunkLineDecoder, Payload
from processor.logs import get_logger

__all__ = ["tee_chunks", "tee_chunks_sync", "tee_sse", "tee_sse_sync"]

log = get_logger(__name__)

T = TypeVar("T")

_Kind = Literal["chunk", "done", "skip"]
_DONE = "[DONE]"


class _ByteStream(Protocol):
    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


class _SyncByteStream(Protocol):
    def iter_bytes(self) -> SyncIterator[bytes]: ...


def _classify(item: Any) -> tuple[_Kind, Any]:
    """What ``item`` is for the publisher, and what to publish for it.

    Text items are SSE ``data`` payloads: ``[DONE]`` (optionally with the ``data:``
    prefix) ends the stream, blank text is a keep-alive. An object with a ``data``
    string and an ``event`` attribute is an SSE event (httpx-sse ``ServerSentEvent``):
    its data is classified the same way. Everything else is a chunk object.
    """
    if isinstance(item, str | bytes | bytearray | memoryview):
        text: str | bytes = bytes(item) if isinstance(item, bytearray | memoryview) else item
        body = text.strip()
        prefixed = False
        if isinstance(body, bytes):
            if body.startswith(b"data:"):
                body, prefixed = body[5:].strip(), True
            done = body == b"[DONE]"
        else:
            if body.startswith("data:"):
                body, prefixed = body[5:].strip(), True
            done = body == _DONE
        if not body:
            return "skip", None
        if done:
            return "done", None
        # a whole SSE line: publish its payload; otherwise the item exactly as received
        return "chunk", (body if prefixed else item)
    data = getattr(item, "data", None)
    if isinstance(data, str) and hasattr(item, "event"):
        kind, _ = _classify(data)
        return kind, data
    return "chunk", item


class _Guard:
    """``async with`` over a stream handle that never lets a publish error escape."""

    def __init__(self, stream: StreamHandle) -> None:
        self.stream = stream
        self.done = False

    async def take(self, item: Any) -> None:
        """Publish ``item`` if it is a chunk; end the stream at ``[DONE]``."""
        kind, value = _classify(item)
        if kind == "skip":
            return
        if kind == "done":
            await self.finish()
        elif self.done:
            _after_done(self.stream.completion_id)
        else:
            await self.send(value)

    async def send(self, chunk: Any) -> None:
        try:
            await self.stream.send(chunk)
        except PublishError as exc:  # already counted and reported by the publisher
            _failed(self.stream.completion_id, exc)

    async def finish(self) -> None:
        """``[DONE]``: send the end marker now, so the worker need not wait for the
        connection to close."""
        if self.done:
            return
        self.done = True
        self.stream.mark_done()
        try:
            await self.stream.close("done")
        except PublishError as exc:
            _failed(self.stream.completion_id, exc)

    async def __aenter__(self) -> _Guard:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stream.__aexit__(et, ev, tb)
        except PublishError as exc:
            _failed(self.stream.completion_id, exc)


class _SyncGuard:
    """The same as :class:`_Guard` for a :class:`SyncStreamHandle`."""

    def __init__(self, stream: SyncStreamHandle) -> None:
        self.stream = stream
        self.done = False

    def take(self, item: Any) -> None:
        kind, value = _classify(item)
        if kind == "skip":
            return
        if kind == "done":
            self.finish()
        elif self.done:
            _after_done(self.stream.completion_id)
        else:
            try:
                self.stream.send(value)
            except PublishError as exc:
                _failed(self.stream.completion_id, exc)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.stream.mark_done()
        try:
            self.stream.close("done")
        except PublishError as exc:
            _failed(self.stream.completion_id, exc)

    def __enter__(self) -> _SyncGuard:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stream.__exit__(et, ev, tb)
        except PublishError as exc:
            _failed(self.stream.completion_id, exc)


def _failed(completion_id: str | None, exc: PublishError) -> None:
    log.warning("tee_publish_failed", completion_id=completion_id, error=str(exc))


def _after_done(completion_id: str | None) -> None:
    log.warning(
        "chunk_after_done_not_published",
        completion_id=completion_id,
        hint="the upstream sent data after [DONE]; it was passed through, not published",
    )


async def tee_chunks(source: AsyncIterable[T], stream: StreamHandle) -> AsyncGenerator[T, None]:
    """Yield every item of ``source`` unchanged, publishing each chunk on ``stream``.

    Items: openai SDK ``ChatCompletionChunk`` objects, dicts, JSON bytes/str, or SSE data
    strings / events (``[DONE]`` ends the stream, keep-alives are not published).
    """
    async with _Guard(stream) as guard:
        async for item in source:
            await guard.take(item)
            yield item


def tee_chunks_sync(source: Iterable[T], stream: SyncStreamHandle) -> Generator[T, None, None]:
    """:func:`tee_chunks` for synchronous iterators (the sync ``OpenAI`` client's stream,
    httpx-sse's ``iter_sse()``) and a :class:`SyncPublisher` stream."""
    with _SyncGuard(stream) as guard:
        for item in source:
            guard.take(item)
            yield item


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


def tee_sse_sync(
    source: _SyncByteStream | Iterable[bytes], stream: SyncStreamHandle
) -> Generator[bytes, None, None]:
    """:func:`tee_sse` for a synchronous byte stream (httpx ``Response.iter_bytes()``,
    or any iterable of bytes) and a :class:`SyncPublisher` stream."""
    iterable: Iterable[bytes]
    iterable = source.iter_bytes() if hasattr(source, "iter_bytes") else source
    decoder = ChunkLineDecoder()
    with _SyncGuard(stream) as guard:
        for raw in iterable:
            _publish_sync(decoder.decode(raw), guard)
            yield raw
        _publish_sync(decoder.flush(), guard)


async def _publish(payloads: list[Payload], guard: _Guard) -> None:
    for payload in payloads:
        if payload.done:
            await guard.finish()
        elif payload.error is None:
            if guard.done:
                _after_done(guard.stream.completion_id)
            else:
                await guard.send(payload.data)


def _publish_sync(payloads: list[Payload], guard: _SyncGuard) -> None:
    for payload in payloads:
        if payload.done:
            guard.finish()
        elif payload.error is None:
            if guard.done:
                _after_done(guard.stream.completion_id)
            else:
                try:
                    guard.stream.send(payload.data)
                except PublishError as exc:
                    _failed(guard.stream.completion_id, exc)
