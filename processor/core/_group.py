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

    ``single=True``: the input is ONE stream whatever its chunks' ids say (Groq compound
    models give every chunk of an answer a new id, the last one ``"stub"``): every chunk
    goes to one assembler, whose id is the first non-empty one. This is what the worker
    does for a keyed stream (the record key is the stream's identity).
    """

    def __init__(self, *, single: bool = False) -> None:
        self.assemblers: dict[str, Assembler] = {}
        self._held: list[ChatCompletionChunk] = []
        self._single: Assembler | None = Assembler() if single else None
        if self._single is not None:
            self.assemblers[""] = self._single

    def add(self, chunk: ChatCompletionChunk, seq: int | None = None, size: int = 0) -> bool:
        single = self._single
        if single is not None:
            return single.add(chunk, seq, size)
        key = chunk.id
        if not key:
            if is_placeholder(chunk):
                self._held.append(chunk)
                return True
            key = ""
        asm = self.assemblers.get(key)
        if asm is None:
            asm = self.assemblers[key] = Assembler(key or None)
            if self._held:
                for held in self._held:
                    asm.add(held)
                self._held.clear()
        return asm.add(chunk, seq, size)

    def finish(self) -> list[ChatCompletion]:
        if self._single is not None and not self._single.chunk_count:
            return []
        return [asm.finish() for asm in self.assemblers.values()]


def assemble_many(
    chunks: Iterable[ChatCompletionChunk], *, single: bool = False
) -> list[ChatCompletion]:
    """Finished responses for every completion in ``chunks``, in first-seen order
    (``single=True``: all of ``chunks`` are one stream, see :class:`StreamGrouper`)."""
    grouper = StreamGrouper(single=single)
    for chunk in chunks:
        grouper.add(chunk)
    return grouper.finish()
