"""Assemble many interleaved completions at once (``chunkstitch assemble``)."""

from __future__ import annotations

from collections.abc import Iterable

from processor.core._assembler import Assembler
from processor.core._parse import is_placeholder
from topics._chunk import ChatCompletionChunk
from topics._response import ChatCompletion

__all__ = ["StreamGrouper", "assemble_many"]


class StreamGrouper:
    """Routes chunks to one :class:`Assembler` per completion id, in first-seen order.

    Azure placeholder chunks (no id) are held and given to the next completion that
    starts, which is the one they precede on the wire.
    """

    def __init__(self) -> None:
        self.assemblers: dict[str, Assembler] = {}
        self._held: list[ChatCompletionChunk] = []

    def add(self, chunk: ChatCompletionChunk, seq: int | None = None, size: int = 0) -> bool:
        if is_placeholder(chunk):
            self._held.append(chunk)
            return True
        key = chunk.id or ""
        asm = self.assemblers.get(key)
        if asm is None:
            asm = self.assemblers[key] = Assembler(key or None)
            for held in self._held:
                asm.add(held)
            self._held.clear()
        return asm.add(chunk, seq, size)

    def finish(self) -> list[ChatCompletion]:
        return [asm.finish() for asm in self.assemblers.values()]


def assemble_many(chunks: Iterable[ChatCompletionChunk]) -> list[ChatCompletion]:
    """Finished responses for every completion in ``chunks``, in first-seen order."""
    grouper = StreamGrouper()
    for chunk in chunks:
        grouper.add(chunk)
    return grouper.finish()
