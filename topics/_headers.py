"""The record contract of the chunk topic: Kafka record headers (all optional).

A chunk record is ``key = completion id`` (UTF-8), ``value = the chunk JSON exactly as the
provider sent it``. The publisher library adds these headers; a bare record with none of
them (and even no key) is still accepted by the worker.

End-of-stream marker: a record on the same key with an **empty value** and the
``cs-end`` header holding the number of chunks the stream had (``cs-end-reason`` says why
it ended: ``done`` when the gateway saw ``[DONE]``, ``closed`` when the upstream closed,
``aborted`` when the gateway's own code failed mid-stream).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ATTRIBUTE_NAME_MAX",
    "HEADER_ATTR_PREFIX",
    "HEADER_END",
    "HEADER_END_REASON",
    "HEADER_PROVIDER",
    "HEADER_REROUTED",
    "HEADER_SEQ",
    "HEADER_STARTED_AT",
    "HEADER_TENANT",
    "HEADER_USER",
    "KEY_MAX_BYTES",
    "LABEL_MAX_BYTES",
    "STARTED_AT_EARLIEST_MS",
    "STARTED_AT_LATEST_MS",
    "STARTED_AT_MAX_AHEAD_MS",
    "EndReason",
    "HeaderError",
    "RecordMeta",
    "check_attribute_name",
    "check_label",
    "decode_headers",
    "encode_headers",
    "plausible_started_at",
]

HEADER_SEQ = "cs-seq"
"""0-based sequence number of the chunk within its stream (ASCII decimal)."""
HEADER_END = "cs-end"
"""On the end-of-stream marker only: the number of chunks in the stream (ASCII decimal)."""
HEADER_END_REASON = "cs-end-reason"
"""On the end-of-stream marker only: ``done`` | ``closed`` | ``aborted``."""
HEADER_TENANT = "cs-tenant"
HEADER_PROVIDER = "cs-provider"
HEADER_STARTED_AT = "cs-started-at"
"""When the gateway received the request: Unix epoch milliseconds (ASCII decimal).
Range-checked by :func:`plausible_started_at`; an implausible value is ignored."""
HEADER_USER = "cs-user"
"""The end user the request was made for (a usage dimension). See :func:`check_label`."""
HEADER_ATTR_PREFIX = "cs-attr-"
"""``cs-attr-<name>``: a publisher-set attribute (api key name, feature, environment, ...).
The worker carries only the names in ``CHUNKSTITCH_USAGE_ATTRIBUTES`` into the response
and the rollups. Names: :func:`check_attribute_name`; values: :func:`check_label`."""
LABEL_MAX_BYTES = 256
"""Longest ``cs-user`` / ``cs-attr-*`` value (UTF-8 bytes)."""
ATTRIBUTE_NAME_MAX = 32
_ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]*")
HEADER_REROUTED = "cs-rerouted"
"""Set by the worker when it re-keys a bare (keyless) record: ``topic/partition/offset``."""

EndReason = Literal["done", "closed", "aborted"]
_END_REASONS: frozenset[str] = frozenset({"done", "closed", "aborted"})

HeaderList = Sequence[tuple[str, bytes]]


class HeaderError(ValueError):
    """A chunkstitch header is present but malformed; the message names the header."""


@dataclass(frozen=True, slots=True)
class RecordMeta:
    """The chunkstitch headers of one record, decoded."""

    seq: int | None = None
    end_count: int | None = None
    end_reason: EndReason | None = None
    tenant: str | None = None
    provider: str | None = None
    started_at_ms: int | None = None
    rerouted_from: str | None = None
    user: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()
    """``cs-attr-<name>`` headers: (name, value), sorted by name, every one valid."""
    ignored: tuple[tuple[str, str], ...] = ()
    """``cs-user`` / ``cs-attr-*`` headers that were not valid: (header, problem). The
    worker ignores them (counted and logged), the record itself is fine."""

    @property
    def is_end_marker(self) -> bool:
        return self.end_count is not None


def _int(name: str, raw: bytes) -> int:
    try:
        value = int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"header {name!r} must be an ASCII integer, got {raw[:40]!r}") from None
    if value < 0:
        raise HeaderError(f"header {name!r} must not be negative, got {value}")
    return value


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"header {name!r} is not valid UTF-8") from None


def check_attribute_name(name: str) -> str | None:
    """What is wrong with an attribute name (None: it is fine): lowercase ASCII letters,
    digits and ``_``, starting with a letter, at most :data:`ATTRIBUTE_NAME_MAX` long."""
    if not name or len(name) > ATTRIBUTE_NAME_MAX or not _ATTRIBUTE_NAME.fullmatch(name):
        return (
            f"attribute name {name[:40]!r} must be 1-{ATTRIBUTE_NAME_MAX} lowercase letters, "
            "digits or '_', starting with a letter"
        )
    return None


def check_label(what: str, value: str) -> str | None:
    """What is wrong with a ``cs-user`` / ``cs-attr-*`` value (None: it is fine): printable
    text (no control characters), at most :data:`LABEL_MAX_BYTES` UTF-8 bytes."""
    if len(value.encode("utf-8", "surrogatepass")) > LABEL_MAX_BYTES:
        return f"{what} is longer than {LABEL_MAX_BYTES} bytes: {value[:40]!r}..."
    if not value.isprintable():
        return f"{what} must be printable text (no control characters), got {value[:40]!r}"
    return None


def _label(name: str, raw: bytes) -> tuple[str | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"header {name!r} is not valid UTF-8"
    problem = check_label(f"header {name!r}", text)
    return (None, problem) if problem else (text or None, None)


def decode_headers(headers: Iterable[tuple[str, bytes | None]] | None) -> RecordMeta:
    """Decode the chunkstitch headers of a record; unknown headers are ignored.

    Raises :class:`HeaderError` when a chunkstitch header is malformed.
    """
    seq = end_count = started = None
    end_reason: EndReason | None = None
    tenant = provider = rerouted = user = None
    attrs: dict[str, str] | None = None
    ignored: list[tuple[str, str]] | None = None
    for name, raw in headers or ():
        if raw is None or not name.startswith("cs-"):
            continue
        if name == HEADER_SEQ:
            seq = _int(name, raw)
        elif name == HEADER_END:
            end_count = _int(name, raw)
        elif name == HEADER_END_REASON:
            text = _text(name, raw)
            if text not in _END_REASONS:
                raise HeaderError(
                    f"header {name!r} must be one of done|closed|aborted, got {text!r}"
                )
            end_reason = text  # type: ignore[assignment]
        elif name == HEADER_TENANT:
            tenant = _text(name, raw) or None
        elif name == HEADER_PROVIDER:
            provider = _text(name, raw) or None
        elif name == HEADER_STARTED_AT:
            started = _int(name, raw)
        elif name == HEADER_REROUTED:
            rerouted = _text(name, raw)
        elif name == HEADER_USER or name.startswith(HEADER_ATTR_PREFIX):
            # Labels, not structure: a bad one is ignored (never the record's content).
            value, problem = _label(name, raw)
            if problem is None and name != HEADER_USER:
                problem = check_attribute_name(name[len(HEADER_ATTR_PREFIX) :])
            if problem is not None:
                ignored = ignored or []
                ignored.append((name, problem))
            elif name == HEADER_USER:
                user = value
            elif value is not None:
                attrs = attrs or {}
                attrs[name[len(HEADER_ATTR_PREFIX) :]] = value
    return RecordMeta(
        seq,
        end_count,
        end_reason,
        tenant,
        provider,
        started,
        rerouted,
        user,
        tuple(sorted(attrs.items())) if attrs else (),
        tuple(ignored) if ignored else (),
    )


def encode_headers(meta: RecordMeta) -> list[tuple[str, bytes]]:
    """Encode :class:`RecordMeta` as Kafka record headers (only the fields that are set)."""
    out: list[tuple[str, bytes]] = []
    if meta.seq is not None:
        out.append((HEADER_SEQ, str(meta.seq).encode()))
    if meta.end_count is not None:
        out.append((HEADER_END, str(meta.end_count).encode()))
    if meta.end_reason is not None:
        out.append((HEADER_END_REASON, meta.end_reason.encode()))
    if meta.tenant:
        out.append((HEADER_TENANT, meta.tenant.encode()))
    if meta.provider:
        out.append((HEADER_PROVIDER, meta.provider.encode()))
    if meta.started_at_ms is not None:
        out.append((HEADER_STARTED_AT, str(meta.started_at_ms).encode()))
    if meta.rerouted_from is not None:
        out.append((HEADER_REROUTED, meta.rerouted_from.encode()))
    if meta.user:
        out.append((HEADER_USER, meta.user.encode()))
    for name, value in meta.attributes:
        if value:
            out.append((HEADER_ATTR_PREFIX + name, value.encode()))
    return out


KEY_MAX_BYTES = 1024
"""Longest completion id (record key, or the chunk's ``id`` of a keyless record) accepted:
the id is the key of the response and of the ledger record, and is repeated in the
response body; a longer one is an ``oversize`` dead letter, never a record the topic
cannot take."""

STARTED_AT_EARLIEST_MS = 946_684_800_000
"""2000-01-01T00:00:00Z: an earlier ``cs-started-at`` is not a request start (a clock at
zero, or seconds sent where milliseconds belong)."""
STARTED_AT_MAX_AHEAD_MS = 86_400_000
"""How far (1 day) ``cs-started-at`` may lie ahead of the record's own timestamp: a
request starts before its chunks are produced; one day leaves room for any clock skew."""
STARTED_AT_LATEST_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z, the last instant a datetime holds: the bound when the record
has no timestamp."""


def plausible_started_at(started_ms: int, record_ts_ms: int | None) -> bool:
    """Whether a ``cs-started-at`` value may be used as the request's start: not before
    :data:`STARTED_AT_EARLIEST_MS`, and not more than :data:`STARTED_AT_MAX_AHEAD_MS`
    after the record's own timestamp (without one, not after
    :data:`STARTED_AT_LATEST_MS`). The worker ignores any other value (counted and logged):
    it would otherwise become the stream time of the usage fold and make every later
    completion of the partition late."""
    latest = STARTED_AT_LATEST_MS
    if record_ts_ms is not None:
        latest = min(latest, record_ts_ms + STARTED_AT_MAX_AHEAD_MS)
    return STARTED_AT_EARLIEST_MS <= started_ms <= latest
