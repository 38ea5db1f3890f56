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
from processor.core._usage import (
    WINDOWS_MS,
    combine,
    contribution,
    event_time_ms,
    percentile,
    percentiles,
    result,
    roll_up,
    zero,
)

__all__ = [
    "WINDOWS_MS",
    "Assembler",
    "ChunkLineDecoder",
    "ChunkRejected",
    "Decision",
    "DetectionPolicy",
    "Payload",
    "StreamClock",
    "StreamGrouper",
    "assemble_many",
    "combine",
    "contribution",
    "decide",
    "event_time_ms",
    "is_placeholder",
    "normalize_finish_reason",
    "parse_chunk",
    "percentile",
    "percentiles",
    "result",
    "roll_up",
    "zero",
]
