"""Input wire models: one ``chat.completion.chunk`` as providers stream it.

Built from the OpenAI format and the provider SDK pages (Mistral ``CompletionChunk``,
OpenRouter and Atoma ``ChatCompletionChunk``, Azure OpenAI, vLLM). Every model accepts
snake_case *and* camelCase names (TypeScript gateways serialize SDK objects in camelCase)
and keeps fields it does not know (``extra="allow"``): nothing is dropped by validation.
"""

from __future__ import annotations

from typing import Any, TypedDict

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "AudioDelta",
    "ChatCompletionChunk",
    "ChunkChoice",
    "ChunkDelta",
    "ChunkLogprobs",
    "ChunkUsage",
    "FunctionDelta",
    "ToolCallDelta",
]


Int = int | float
"""Provider SDK examples send ``index: 7881.03`` and ``created: 6771.54``; the assembler
truncates such floats (a validator here would cost a Python call per field per chunk)."""


def _either(name: str) -> Any:
    """A multi-word field accepted as snake_case or camelCase (``finish_reason`` /
    ``finishReason``). Explicit per field: a model-wide alias generator with
    validate-by-name doubles the validation cost of every chunk."""
    return Field(default=None, validation_alias=AliasChoices(name, to_camel(name)))


class _Wire(BaseModel):
    """Base of every input model: snake_case or camelCase in, unknown fields kept."""

    model_config = ConfigDict(extra="allow")


class FunctionDelta(_Wire):
    """A fragment of a tool call's function, or of a legacy ``function_call``."""

    name: str | None = None
    # Mistral sends arguments as a JSON object; OpenAI as a string fragment.
    arguments: str | dict[str, Any] | list[Any] | None = None


class ToolCallDelta(TypedDict, total=False):
    """The shape of one tool-call fragment; ``index`` may be missing (some providers).

    Fragments are validated as plain JSON objects (``delta.tool_calls: list[dict]``), not
    as models: tool-call chunks are the most frequent chunks of agentic traffic, and two
    nested models per fragment cost 1.3 us of its ~6 us validation. The assembler reads
    the fields defensively (a wrong type is ignored, never concatenated)."""

    index: int
    id: str
    type: str
    function: dict[str, Any]


class AudioDelta(_Wire):
    """A fragment of an audio response: base64 ``data`` pieces and a ``transcript``."""

    id: str | None = None
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = _either("expires_at")


class ChunkDelta(_Wire):
    """The ``delta`` of one choice in one chunk."""

    role: str | None = None
    # str (OpenAI) or a list of parts (Mistral: text / thinking / reference / image_url ...)
    content: str | list[Any] | None = None
    refusal: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = _either("reasoning_content")
    reasoning_details: list[dict[str, Any]] | None = _either("reasoning_details")
    tool_calls: list[dict[str, Any]] | None = _either("tool_calls")
    function_call: FunctionDelta | None = _either("function_call")
    audio: AudioDelta | None = None
    annotations: list[Any] | None = None


class ChunkLogprobs(_Wire):
    content: list[Any] | None = None
    refusal: list[Any] | None = None


class ChunkChoice(_Wire):
    """One choice of a chunk. ``delta`` may be missing or null (Azure, some proxies)."""

    index: Int = 0
    delta: ChunkDelta | None = None
    finish_reason: str | None = _either("finish_reason")
    native_finish_reason: str | None = _either("native_finish_reason")
    logprobs: ChunkLogprobs | None = None


class ChunkUsage(_Wire):
    """Token usage as reported by the provider (details and provider extras kept)."""

    prompt_tokens: int | None = _either("prompt_tokens")
    completion_tokens: int | None = _either("completion_tokens")
    total_tokens: int | None = _either("total_tokens")
    prompt_tokens_details: dict[str, Any] | None = _either("prompt_tokens_details")
    completion_tokens_details: dict[str, Any] | None = _either("completion_tokens_details")


class ChatCompletionChunk(_Wire):
    """One ``chat.completion.chunk``. Only the shape is checked here; whether it is usable
    (an id, choices or usage) is decided by :func:`processor.core.parse_chunk`."""

    id: str | None = None
    object: str | None = None
    created: Int | None = None
    model: str | None = None
    choices: list[ChunkChoice] = []
    usage: ChunkUsage | None = None
    system_fingerprint: str | None = _either("system_fingerprint")
    service_tier: str | None = _either("service_tier")
    provider: str | None = None
    error: dict[str, Any] | None = None
