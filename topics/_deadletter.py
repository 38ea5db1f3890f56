"""The dead-letter record: a record the worker could not use, kept with the reason."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel

__all__ = ["DeadLetter", "DeadLetterReason"]

DeadLetterReason = Literal[
    "not_json",
    "not_an_object",
    "wrong_type",
    "no_id",
    "bad_header",
    "oversize",
    "late_chunk",
    "orphan_end_marker",
    "undecodable",
    "internal_error",
    "invalid_rollup",  # the usage sink: a rollup record it cannot store
]


DEADLETTER_VALUE_MAX = 512 * 1024
"""Bytes of the original value kept in a dead letter; a longer value is cut to this and
``value_truncated`` is set, so that the letter itself always fits in a Kafka record."""


class DeadLetter(BaseModel):
    """What went wrong, and the original record (bytes base64-encoded) to replay or inspect."""

    reason: DeadLetterReason
    message: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int | None = None
    key_b64: str | None = None
    value_b64: str
    value_size: int | None = None
    """Size of the original value in bytes."""
    value_truncated: bool = False
    """Only the first ``DEADLETTER_VALUE_MAX`` bytes of the value are kept."""
    headers: list[tuple[str, str]] = []
    """(name, base64 value) pairs."""
    completion_id: str | None = None
    worker: str | None = None

    @staticmethod
    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode()
