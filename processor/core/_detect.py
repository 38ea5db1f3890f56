"""Completion detection: when is a completion finished? A pure policy (``now`` is given).

Rules, in order (the first that holds decides):

1. end-of-stream marker seen and every sequence number below its count present -> emit
   now (``aborted`` marker -> status ``incomplete``, reason says the gateway aborted);
2. limits: more chunks or bytes than allowed, or older than the maximum lifetime -> emit
   what exists as ``incomplete`` with the limit as reason;
3. unsequenced stream (no publisher, so no marker will come): every choice finished and
   usage reported -> emit now; every choice finished and the usage grace elapsed -> emit
   now (usage is then reported as missing);
4. idle for longer than the idle timeout -> emit as ``incomplete``.
"""

from __future__ import annotations

from dataclasses import dataclass

from processor.core._assembler import Assembler
from topics._response import Status

__all__ = ["Decision", "DetectionPolicy", "StreamClock", "decide"]


@dataclass(frozen=True, slots=True)
class DetectionPolicy:
    usage_grace_s: float = 2.0
    idle_timeout_s: float = 30.0
    max_lifetime_s: float = 600.0
    max_chunks: int = 20_000
    max_bytes: int = 8 * 1024 * 1024


@dataclass(slots=True)
class StreamClock:
    """What the shell knows about a stream besides its chunks (times in seconds)."""

    opened_at: float
    last_chunk_at: float
    finished_at: float | None = None
    """When every choice was first seen finished (starts the usage grace)."""
    end_count: int | None = None
    end_reason: str | None = None
    sequenced: bool = False
    """Chunks carry sequence numbers: the publisher library always ends such a stream with
    an end-of-stream marker, so rule 3 waits for it (idle timeout as the fallback)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Emit now, with this status (``None``: the assembler's own) and reason."""

    status: Status | None
    reason: str | None
    rule: str


def decide(
    asm: Assembler, clock: StreamClock, now: float, policy: DetectionPolicy
) -> Decision | None:
    """Whether to emit the completion now, and how; ``None`` keeps waiting."""
    if clock.end_count is not None and (
        asm.has_all_seqs_below(clock.end_count)
        or (not clock.sequenced and asm.chunk_count >= clock.end_count)
    ):
        if clock.end_reason == "aborted" and not asm.has_error:
            return Decision("incomplete", "the gateway aborted the stream", "end_marker")
        return Decision(None, None, "end_marker")
    if asm.chunk_count >= policy.max_chunks:
        return Decision("incomplete", f"limit reached: max_chunks={policy.max_chunks}", "limit")
    if asm.byte_size >= policy.max_bytes:
        return Decision("incomplete", f"limit reached: max_bytes={policy.max_bytes}", "limit")
    if now - clock.opened_at >= policy.max_lifetime_s:
        return Decision(
            "incomplete", f"limit reached: max_lifetime_s={policy.max_lifetime_s:g}", "limit"
        )
    if clock.end_count is None and not clock.sequenced and asm.all_choices_finished:
        if asm.usage_reported:
            return Decision(None, None, "finished")
        if clock.finished_at is not None and now - clock.finished_at >= policy.usage_grace_s:
            return Decision(None, None, "usage_grace")
    if now - clock.last_chunk_at >= policy.idle_timeout_s:
        missing = ""
        if clock.end_count is not None:
            lost = asm.missing_below(clock.end_count)
            missing = f"; {lost} of {clock.end_count} chunks never arrived"
        return Decision(
            "incomplete", f"no chunk for {policy.idle_timeout_s:g}s (idle timeout){missing}", "idle"
        )
    return None
