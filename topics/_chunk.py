"""Input wire models: one ``chat.completion.chunk`` as providers stream it.

Built from the OpenAI format and the provider SDK pages (Mistral ``CompletionChunk``,
OpenRouter and Atoma ``ChatCompletionChunk``, Azure OpenAI, vLLM). Every model accepts
snake_case *and* camelCase names (TypeScript gateways serialize SDK objects in camelCase)
and keeps fields it does not know (``extra="allow"``): nothing is dropped by validation.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

__all__ = [
    "MAX_CHOICE_INDEX",
    "MAX_COST_USD",
    "MAX_COUNT",
    "AudioDelta",
    "ChatCompletionChunk",
    "ChunkChoice",
    "ChunkDelta",
    "ChunkLogprobs",
    "ChunkUsage",
    "FunctionDelta",
    "ToolCallDelta",
]


MAX_CHOICE_INDEX = 2**31 - 1
"""Largest choice ``index`` accepted: a signed 32-bit integer, what typed consumers hold."""
MAX_COUNT = 2**53 - 1
"""Largest token count or ``created`` / ``expires_at`` time accepted: the largest integer
every JSON reader (JavaScript's doubles included) holds exactly."""
MAX_COST_USD = 1e9
"""Largest usage ``cost`` (USD) accepted; the usage fold keeps it in nano-USD integers."""


# Finite numbers in 0 .. a bound, int or float. Provider SDK examples send
# ``index: 7881.03`` and ``created: 6771.54``; the assembler truncates such floats. The
# bounds are pydantic-core constraints on each member (checked in Rust, no Python call per
# field per chunk): non-finite (``1e999``, ``NaN``, ``Infinity``), negative and huge values
# are rejected at validation, naming the field. Left to right (int first, then float) costs
# no more than the unconstrained ``int | float`` did; pydantic's smart union costs 5 %.
Index = Annotated[
    Annotated[int, Field(ge=0, le=MAX_CHOICE_INDEX)]
    | Annotated[float, Field(ge=0, le=MAX_CHOICE_INDEX, allow_inf_nan=False)],
    Field(union_mode="left_to_right"),
]
Time = Annotated[
    Annotated[int, Field(ge=0, le=MAX_COUNT)]
    | Annotated[float, Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)],
    Field(union_mode="left_to_right"),
]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
"""A token count: an integer (``5.0`` is accepted as 5) in ``0 .. MAX_COUNT``."""


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
    expires_at: Count | None = _either("expires_at")


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

    index: Index = 0
    delta: ChunkDelta | None = None
    finish_reason: str | None = _either("finish_reason")
    native_finish_reason: str | None = _either("native_finish_reason")
    logprobs: ChunkLogprobs | None = None


class ChunkUsage(_Wire):
    """Token usage as reported by the provider (details and provider extras kept)."""

    prompt_tokens: Count | None = _either("prompt_tokens")
    completion_tokens: Count | None = _either("completion_tokens")
    total_tokens: Count | None = _either("total_tokens")
    prompt_tokens_details: dict[str, Any] | None = _either("prompt_tokens_details")
    completion_tokens_details: dict[str, Any] | None = _either("completion_tokens_details")

    @model_validator(mode="after")
    def _known_numbers(self) -> ChunkUsage:
        """The numbers inside usage that the usage fold reads (``cost``, ``cached_tokens``,
        ``reasoning_tokens``) are range-checked like the token counts. Python, but only
        for chunks that carry usage (about one per stream)."""
        extra = self.__pydantic_extra__
        if extra and "cost" in extra:
            _check_number("cost", extra["cost"], MAX_COST_USD)
        for name, details, keys in (
            ("prompt_tokens_details", self.prompt_tokens_details, _CACHED),
            ("completion_tokens_details", self.completion_tokens_details, _REASONING),
        ):
            if details:
                for key in keys:
                    if key in details:
                        _check_number(f"{name}.{key}", details[key], MAX_COUNT)
        return self


_CACHED = ("cached_tokens", "cachedTokens")
_REASONING = ("reasoning_tokens", "reasoningTokens")


def _check_number(field: str, value: Any, limit: float) -> None:
    """A known number, when it is a number, must be finite and in ``0 .. limit`` (other
    types are kept as they are and ignored by the fold)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not 0 <= value <= limit:  # also False for NaN and the infinities
        raise PydanticCustomError(
            "out_of_range",
            "must be a finite number from 0 to {limit}, got {value}",
            {"field": field, "limit": f"{limit:.0f}", "value": repr(value)[:40]},
        )


class ChatCompletionChunk(_Wire):
    """One ``chat.completion.chunk``. Only the shape is checked here; whether it is usable
    (an id, choices or usage) is decided by :func:`processor.core.parse_chunk`."""

    id: str | None = None
    object: str | None = None
    created: Time | None = None
    model: str | None = None
    choices: list[ChunkChoice] = []
    usage: ChunkUsage | None = None
    system_fingerprint: str | None = _either("system_fingerprint")
    service_tier: str | None = _either("service_tier")
    provider: str | None = None
    error: dict[str, Any] | None = None
