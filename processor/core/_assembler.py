"""The incremental assembler of one completion."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from processor.core._merge import ChoiceState, normalize_finish_reason, snake_keys
from topics._chunk import ChatCompletionChunk, ChunkUsage
from topics._response import ChatCompletion, Status

__all__ = ["Assembler"]

# Padding fields some providers add to every chunk; meaningless once merged.
_PADDING = frozenset({"obfuscation", "p"})


class _Usage:
    """Usage merge: last non-zero value per field; never summed; details merged key-wise."""

    __slots__ = ("completion", "details", "extra", "prompt", "seen", "total")

    def __init__(self) -> None:
        self.seen = False
        self.prompt = 0
        self.completion = 0
        self.total = 0
        self.details: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}

    def apply(self, usage: ChunkUsage) -> None:
        self.seen = True
        if usage.prompt_tokens:
            self.prompt = usage.prompt_tokens
        if usage.completion_tokens:
            self.completion = usage.completion_tokens
        if usage.total_tokens:
            self.total = usage.total_tokens
        for name in ("prompt_tokens_details", "completion_tokens_details"):
            value = getattr(usage, name)
            if value:
                slot = self.details.setdefault(name, {})
                for key, item in snake_keys(value).items():
                    if item is not None and (item != 0 or key not in slot):
                        slot[key] = item
        if usage.model_extra:
            for key, item in snake_keys(usage.model_extra).items():
                if item is not None:
                    self.extra[key] = item

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": max(self.total, self.prompt + self.completion),
        }
        out.update(self.details)
        return out


class Assembler:
    """Incremental assembly of ONE completion from its chunks.

    ``add`` merges one chunk (O(1) amortised: text pieces are appended, joined only by
    :meth:`snapshot` / :meth:`finish`). Chunks carrying a per-stream sequence number are
    applied in sequence order, duplicates dropped; chunks without one in arrival order.
    """

    __slots__ = (
        "_choices",
        "_created",
        "_error",
        "_extra",
        "_groq_usage",
        "_id",
        "_model",
        "_pending",
        "_seen_seqs",
        "_sequenced",
        "_top",
        "_usage",
        "byte_size",
        "chunk_count",
        "duplicates_dropped",
        "next_seq",
    )

    def __init__(self, completion_id: str | None = None) -> None:
        self._id = completion_id or None
        self._created: int | None = None
        self._model: str | None = None
        self._top: dict[str, Any] = {}  # system_fingerprint / service_tier / provider
        self._extra: dict[str, Any] = {}
        self._error: dict[str, Any] | None = None
        self._choices: dict[float, ChoiceState] = {}
        self._usage = _Usage()
        self._groq_usage: _Usage | None = None  # x_groq.usage: used when no usage came
        self._pending: dict[int, ChatCompletionChunk] = {}
        self._seen_seqs: set[int] = set()
        self._sequenced = False
        self.next_seq = 0
        self.chunk_count = 0
        self.duplicates_dropped = 0
        self.byte_size = 0

    # -- input ------------------------------------------------------------------------
    def add(self, chunk: ChatCompletionChunk, seq: int | None = None, size: int = 0) -> bool:
        """Merge one chunk; ``False`` when it was a duplicate (its ``seq`` was seen) and dropped.

        ``size`` is the chunk's raw byte size, summed into :attr:`byte_size` for limits.
        """
        if seq is not None:
            self._sequenced = True
            if seq < self.next_seq or seq in self._pending:
                self.duplicates_dropped += 1
                return False
            self.chunk_count += 1
            self.byte_size += size
            if seq != self.next_seq:
                self._pending[seq] = chunk
                return True
            self._apply(chunk)
            self.next_seq += 1
            pending = self._pending
            while pending and self.next_seq in pending:
                self._apply(pending.pop(self.next_seq))
                self.next_seq += 1
            return True
        self.chunk_count += 1
        self.byte_size += size
        self._apply(chunk)
        return True

    def _apply(self, chunk: ChatCompletionChunk) -> None:
        if chunk.id and self._id is None:
            self._id = chunk.id
        if chunk.created and self._created is None:
            self._created = int(chunk.created)  # the first real one (placeholders send 0)
        if chunk.model:
            self._model = chunk.model  # the later, concrete model wins (Azure model router)
        top = self._top
        if chunk.system_fingerprint is not None and "system_fingerprint" not in top:
            top["system_fingerprint"] = chunk.system_fingerprint
        if chunk.service_tier is not None and "service_tier" not in top:
            top["service_tier"] = chunk.service_tier
        if chunk.provider is not None and "provider" not in top:
            top["provider"] = chunk.provider
        if chunk.error is not None:
            self._error = chunk.error
        if chunk.usage is not None:
            self._usage.apply(chunk.usage)
        choices = self._choices
        for choice in chunk.choices:
            index = choice.index
            state = choices.get(index)
            if state is None:
                state = choices[index] = ChoiceState(int(index))
            state.apply(choice)
        extra = chunk.__pydantic_extra__
        if extra:
            for key, value in extra.items():
                if key not in _PADDING and value is not None:
                    self._extra[key] = value
            groq = extra.get("x_groq")
            if isinstance(groq, dict) and isinstance(groq.get("usage"), dict):
                self._apply_groq_usage(groq["usage"])

    def _apply_groq_usage(self, raw: dict[str, Any]) -> None:
        """Older Groq models report usage only as ``x_groq.usage`` (with Groq's timings:
        ``queue_time``, ``total_time`` ...). It is the usage when the stream has no
        top-level ``usage``; a top-level one always wins. Unreadable -> kept as an extra."""
        try:
            usage = ChunkUsage.model_validate(raw)
        except ValidationError:
            return
        if self._groq_usage is None:
            self._groq_usage = _Usage()
        self._groq_usage.apply(usage)

    @property
    def _effective_usage(self) -> _Usage:
        if not self._usage.seen and self._groq_usage is not None:
            return self._groq_usage
        return self._usage

    # -- state for completion detection -------------------------------------------------
    @property
    def completion_id(self) -> str | None:
        return self._id

    @property
    def all_choices_finished(self) -> bool:
        """Every choice seen so far has a finish reason (False while no choice was seen)."""
        return bool(self._choices) and all(c.finished for c in self._choices.values())

    @property
    def usage_reported(self) -> bool:
        return self._usage.seen or self._groq_usage is not None

    @property
    def has_error(self) -> bool:
        """A provider error object or a finish reason ``error`` was seen."""
        if self._error is not None:
            return True
        return any(
            c.finish_reason is not None and normalize_finish_reason(c.finish_reason) == "error"
            for c in self._choices.values()
        )

    @property
    def missing_chunks(self) -> int:
        """Sequence numbers below the highest one seen that never arrived."""
        if not self._pending:
            return 0
        return max(self._pending) + 1 - self.next_seq - len(self._pending)

    def missing_below(self, count: int) -> int:
        """How many of the chunks ``0 .. count-1`` (an end marker's count) never arrived.

        Counts the gaps inside the sequence *and* the chunks missing after the highest one
        seen (a stream whose last chunks were lost, or were not chunks at all). For a
        stream without sequence numbers: how many fewer chunks than ``count`` arrived.
        """
        if not self._sequenced:
            return max(count - self.chunk_count, 0)
        if count <= self.next_seq:
            return 0
        arrived = sum(1 for s in self._pending if s < count) if self._pending else 0
        return count - self.next_seq - arrived

    def has_all_seqs_below(self, n: int) -> bool:
        """True when every sequence number ``0 .. n-1`` has been applied."""
        return self.next_seq >= n

    # -- output -----------------------------------------------------------------------
    def snapshot(self, *, expected: int | None = None) -> ChatCompletion:
        """The response as it stands; the assembler keeps accepting chunks."""
        return self._build(None, None, drain=False, expected=expected)

    def finish(
        self,
        *,
        status: Status | None = None,
        reason: str | None = None,
        expected: int | None = None,
    ) -> ChatCompletion:
        """The final response. Out-of-order chunks still waiting are applied in sequence
        order; a gap in the sequence makes the response ``incomplete``.

        ``expected`` is the stream's chunk count when known (the end-of-stream marker's
        ``cs-end``): ``missing_chunks`` then also counts chunks lost after the last one
        that arrived, as the idle-timeout reason does (:meth:`missing_below`).
        """
        return self._build(status, reason, drain=True, expected=expected)

    def _build(
        self, status: Status | None, reason: str | None, *, drain: bool, expected: int | None
    ) -> ChatCompletion:
        missing = self.missing_chunks
        if expected is not None:
            missing = max(missing, self.missing_below(expected))
        if drain and self._pending:
            for seq in sorted(self._pending):
                self._apply(self._pending[seq])
            self.next_seq = max(self._pending) + 1
            self._pending.clear()
        auto_status, auto_reason = self._status(missing)
        usage = self._effective_usage
        if status is None:
            status, reason = auto_status, reason or auto_reason
        elif reason is None and status == auto_status:
            reason = auto_reason
        body: dict[str, Any] = {
            **self._extra,
            "id": self._id or "",
            "object": "chat.completion",
            "created": self._created or 0,
            "model": self._model or "",
            "choices": [self._choices[i].choice() for i in sorted(self._choices)],
            "usage": usage.to_dict() if usage.seen else None,
            **self._top,
            "error": self._error,
            "chunkstitch": {
                "status": status,
                "reason": reason,
                "chunk_count": self.chunk_count,
                "duplicates_dropped": self.duplicates_dropped,
                "missing_chunks": missing,
                "usage_reported": usage.seen,
            },
        }
        return ChatCompletion.model_validate(body)

    def _status(self, missing: int) -> tuple[Status, str | None]:
        if self._error is not None:
            message = self._error.get("message") if isinstance(self._error, dict) else None
            return "error", f"provider error: {message or self._error}"
        errored = [
            c.index
            for c in self._choices.values()
            if c.finish_reason is not None and normalize_finish_reason(c.finish_reason) == "error"
        ]
        if errored:
            return "error", f"choice {errored[0]} finished with reason 'error'"
        if not self._choices:
            return "incomplete", "no choice was received"
        open_choices = [c.index for c in self._choices.values() if not c.finished]
        if open_choices:
            which = ", ".join(str(i) for i in sorted(open_choices))
            return "incomplete", f"stream ended without a finish_reason for choice {which}"
        if missing:
            return "incomplete", f"{missing} chunk(s) missing from the sequence"
        return "complete", None
