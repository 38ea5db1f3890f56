"""Completion detection: the pure policy, one test per rule."""

from __future__ import annotations

from processor.core import Assembler, DetectionPolicy, StreamClock, decide, parse_chunk

POLICY = DetectionPolicy(
    usage_grace_s=2, idle_timeout_s=30, max_lifetime_s=600, max_chunks=50, max_bytes=10_000
)


def _asm(finished: bool = False, usage: bool = False, seqs: int | None = None) -> Assembler:
    asm = Assembler("c")
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]}]
    if finished:
        chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        chunks.append(
            {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        )
    for i, c in enumerate(chunks):
        asm.add(parse_chunk(c), i if seqs is not None else None, 100)
    return asm


def test_end_marker_with_all_seqs_emits_at_once() -> None:
    asm = _asm(finished=True, seqs=2)
    clock = StreamClock(
        opened_at=0, last_chunk_at=0, end_count=2, end_reason="done", sequenced=True
    )
    decision = decide(asm, clock, 0.0, POLICY)
    assert decision is not None
    assert decision.rule == "end_marker"
    assert decision.status is None


def test_end_marker_waits_for_missing_seqs_then_idle_names_them() -> None:
    asm = _asm(finished=True, seqs=2)
    clock = StreamClock(
        opened_at=0, last_chunk_at=0, end_count=5, end_reason="done", sequenced=True
    )
    assert decide(asm, clock, 10.0, POLICY) is None
    decision = decide(asm, clock, 31.0, POLICY)
    assert decision is not None
    assert decision.rule == "idle"
    assert "3 of 5 chunks never arrived" in (decision.reason or "")


def test_aborted_marker_is_incomplete_at_once() -> None:
    asm = _asm(seqs=1)
    clock = StreamClock(
        opened_at=0, last_chunk_at=0, end_count=1, end_reason="aborted", sequenced=True
    )
    decision = decide(asm, clock, 0.0, POLICY)
    assert decision is not None
    assert decision.status == "incomplete"
    assert "aborted" in (decision.reason or "")


def test_unsequenced_finished_with_usage_emits_now_without_usage_after_grace() -> None:
    clock = StreamClock(opened_at=0, last_chunk_at=0, finished_at=0)
    decision = decide(_asm(finished=True, usage=True), clock, 0.0, POLICY)
    assert decision is not None
    assert decision.rule == "finished"
    no_usage = _asm(finished=True)
    assert decide(no_usage, clock, 1.0, POLICY) is None
    decision = decide(no_usage, clock, 2.0, POLICY)
    assert decision is not None
    assert decision.rule == "usage_grace"


def test_sequenced_stream_waits_for_its_marker() -> None:
    clock = StreamClock(opened_at=0, last_chunk_at=0, finished_at=0, sequenced=True)
    assert decide(_asm(finished=True, usage=True, seqs=3), clock, 5.0, POLICY) is None


def test_idle_timeout_is_incomplete() -> None:
    clock = StreamClock(opened_at=0, last_chunk_at=0)
    assert decide(_asm(), clock, 29.9, POLICY) is None
    decision = decide(_asm(), clock, 30.0, POLICY)
    assert decision is not None
    assert decision.status == "incomplete"
    assert "idle" in (decision.reason or "")


def test_limits_emit_what_exists() -> None:
    clock = StreamClock(opened_at=0, last_chunk_at=0)
    small = DetectionPolicy(max_chunks=1, max_bytes=10_000)
    decision = decide(_asm(), clock, 0.0, small)
    assert decision is not None
    assert "max_chunks=1" in (decision.reason or "")
    by_bytes = decide(_asm(finished=True), clock, 0.0, DetectionPolicy(max_bytes=150))
    assert by_bytes is not None
    assert "max_bytes=150" in (by_bytes.reason or "")
    old = decide(_asm(), clock, 600.0, POLICY)
    assert old is not None
    assert "max_lifetime_s=600" in (old.reason or "")
