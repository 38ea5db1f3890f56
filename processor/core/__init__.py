"""The functional core of chunkstitch: pure functions and classes over pydantic models.

No I/O, no clock, no logging: it never imports faust, aiokafka, structlog, ``os`` or
``time`` (an architecture test enforces it). Everything Kafka-shaped is the shell's job.
"""

from processor.core._assembler import Assembler
from processor.core._decode import ChunkLineDecoder, Payload
from processor.core._detect import Decision, DetectionPolicy, StreamClock, decide
from processor.core._group import StreamGrouper, assemble_many
from processor.core._merge import normalize_finish_reason
from processor.core._parse import ChunkRejected, is_placeholder, parse_chunk

__all__ = [
    "Assembler",
    "ChunkLineDecoder",
    "ChunkRejected",
    "Decision",
    "DetectionPolicy",
    "Payload",
    "StreamClock",
    "StreamGrouper",
    "assemble_many",
    "decide",
    "is_placeholder",
    "normalize_finish_reason",
    "parse_chunk",
]
