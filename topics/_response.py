"""Output wire models: the finished ``chat.completion`` chunkstitch emits (snake_case).

The shape is OpenAI's ``chat.completion`` (a complete stream with standard finish reasons
validates as ``openai.types.chat.ChatCompletion``) plus a top-level ``chunkstitch`` block
of chunkstitch's own metadata. Provider extras are kept (``extra="allow"``).

Deliberate differences from OpenAI, all documented in the README:

* ``finish_reason`` is the *normalized* reason (``model_length`` -> ``length``); the raw
  value is kept as ``raw_finish_reason`` when it differs. A choice that never finished has
  ``finish_reason: null`` (never ``stop``) and the response status is ``incomplete``.
* ``message.reasoning`` holds reasoning text (``reasoning`` and ``reasoning_content`` are
  one field), ``message.reasoning_details`` OpenRouter's structured reasoning,
  ``message.content_parts`` non-text content parts (Mistral references, images).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _is_none(value: object) -> bool:
    return value is None


# chunkstitch's own optional fields (not OpenAI's): left out of every serialization
# (model_dump, model_dump_json, to_json) when they are None, since a null there says
# nothing. OpenAI's own optional fields (content, tool_calls, system_fingerprint, ...)
# keep their nulls in model_dump so that it mirrors OpenAI's shape; to_json drops all.
def _omit_none() -> Any:
    return Field(default=None, exclude_if=_is_none)


__all__ = [
    "ChatCompletion",
    "ChunkstitchMeta",
    "CompletionChoice",
    "CompletionMessage",
    "CompletionUsage",
    "FunctionCall",
    "MessageAudio",
    "SourceRange",
    "Status",
    "ToolCall",
]

Status = Literal["complete", "incomplete", "error"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Out):
    name: str | None = None
    arguments: str = ""


class ToolCall(_Out):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class MessageAudio(_Out):
    id: str | None = None
    data: str = ""
    transcript: str = ""
    expires_at: int | None = None


class CompletionMessage(_Out):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    reasoning: str | None = _omit_none()
    reasoning_details: list[dict[str, Any]] | None = _omit_none()
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    audio: MessageAudio | None = None
    annotations: list[Any] | None = None
    content_parts: list[Any] | None = _omit_none()


class ChoiceLogprobs(_Out):
    content: list[Any] | None = None
    refusal: list[Any] | None = None


class CompletionChoice(_Out):
    index: int
    message: CompletionMessage
    finish_reason: str | None = None
    raw_finish_reason: str | None = _omit_none()
    native_finish_reason: str | None = _omit_none()
    logprobs: ChoiceLogprobs | None = None


class CompletionUsage(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class SourceRange(BaseModel):
    """Where the chunks came from (filled by the worker)."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int


class ChunkstitchMeta(BaseModel):
    """chunkstitch's own metadata about how the response was assembled."""

    status: Status
    reason: str | None = _omit_none()
    chunk_count: int = 0
    duplicates_dropped: int = 0
    missing_chunks: int = 0
    usage_reported: bool = False
    # Filled by the worker (None when assembled offline by `chunkstitch assemble`):
    tenant: str | None = _omit_none()
    provider: str | None = _omit_none()
    request_started_at_ms: int | None = _omit_none()
    first_chunk_at_ms: int | None = _omit_none()
    last_chunk_at_ms: int | None = _omit_none()
    time_to_first_chunk_ms: int | None = _omit_none()
    duration_ms: int | None = _omit_none()
    source: SourceRange | None = _omit_none()
    # Cost (issue 16): the provider's own figure, else an estimate from a price database,
    # never mixed; the worker fills them in (processor/pricing.py).
    cost_reported: float | None = _omit_none()
    """USD the provider reported (``usage.cost``)."""
    cost_estimated: float | None = _omit_none()
    """USD estimated where the provider reported none; None when the model is unknown."""
    price_data: str | None = _omit_none()
    """The price data the estimate comes from, e.g. ``genai-prices 0.2.3``."""
    # Usage dimensions (issue 16), from the publisher's headers:
    user: str | None = _omit_none()
    """The end user (``cs-user``)."""
    attributes: dict[str, str] | None = _omit_none()
    """The ``cs-attr-<name>`` headers whose names are in the worker's
    ``CHUNKSTITCH_USAGE_ATTRIBUTES`` allowlist (only those: the usage fold counts exactly
    what the response carries, so changing the allowlist never re-buckets a replay)."""


class ChatCompletion(_Out):
    """A finished ``chat.completion`` with chunkstitch's metadata block."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    provider: str | None = _omit_none()
    error: dict[str, Any] | None = _omit_none()
    chunkstitch: ChunkstitchMeta

    def to_json(self) -> bytes:
        """Canonical serialization (snake_case, nulls omitted): same content, same bytes.

        Calls pydantic-core's serializer directly: it returns the UTF-8 bytes that
        ``model_dump_json`` would decode to ``str`` (and the caller encode again); the same
        bytes, about 20% faster (benchmarks/core.py measures it).
        """
        data: bytes = self.__pydantic_serializer__.to_json(self, exclude_none=True)
        return data
