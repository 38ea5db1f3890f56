"""Input wire models: one ``chat.completion.chunk`` as providers stream it.

Built from the OpenAI format and the provider SDK pages (Mistral ``CompletionChunk``,
OpenRouter and Atoma ``ChatCompletionChunk``, Azure OpenAI, vLLM). Every model accepts
snake_case *and* camelCase names (TypeScript gateways serialize SDK objects in camelCase)
and keeps fields it does not know (``extra="allow"``): nothing is dropped by validation.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasGenerator, BaseModel, BeforeValidator, ConfigDict
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


def _int_from_number(value: Any) -> Any:
    """Provider SDK examples send ``index: 7881.03`` and ``created: 6771.54``: truncate floats."""
    if isinstance(value, float):
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_int_from_number)]


class _Wire(BaseModel):
    """Base of every input model: snake_case or camelCase in, unknown fields kept."""

    model_config = ConfigDict(
        extra="allow",
        alias_generator=AliasGenerator(validation_alias=to_camel),
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=False,
        frozen=False,
    )


class FunctionDelta(_Wire):
    """A fragment of a tool call's function, or of a legacy ``function_call``."""

    name: str | None = None
    # Mistral sends arguments as a JSON object; OpenAI as a string fragment.
    arguments: str | dict[str, Any] | list[Any] | None = None


class ToolCallDelta(_Wire):
    """A fragment of one tool call; ``index`` may be missing (some providers)."""

    index: Int | None = None
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class AudioDelta(_Wire):
    """A fragment of an audio response: base64 ``data`` pieces and a ``transcript``."""

    id: str | None = None
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None


class ChunkDelta(_Wire):
    """The ``delta`` of one choice in one chunk."""

    role: str | None = None
    # str (OpenAI) or a list of parts (Mistral: text / thinking / reference / image_url ...)
    content: str | list[Any] | None = None
    refusal: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    reasoning_details: list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None
    audio: AudioDelta | None = None
    annotations: list[Any] | None = None


class ChunkLogprobs(_Wire):
    content: list[Any] | None = None
    refusal: list[Any] | None = None


class ChunkChoice(_Wire):
    """One choice of a chunk. ``delta`` may be missing or null (Azure, some proxies)."""

    index: Int = 0
    delta: ChunkDelta | None = None
    finish_reason: str | None = None
    native_finish_reason: str | None = None
    logprobs: ChunkLogprobs | None = None


class ChunkUsage(_Wire):
    """Token usage as reported by the provider (details and provider extras kept)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class ChatCompletionChunk(_Wire):
    """One ``chat.completion.chunk``. Only the shape is checked here; whether it is usable
    (an id, choices or usage) is decided by :func:`processor.core.parse_chunk`."""

    id: str | None = None
    object: str | None = None
    created: Int | None = None
    model: str | None = None
    choices: list[ChunkChoice] = []
    usage: ChunkUsage | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    provider: str | None = None
    error: dict[str, Any] | None = None
