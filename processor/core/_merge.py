"""Per-choice merge state: the rules that turn deltas into one message.

Every text field is appended to a list of pieces and joined only when a snapshot is
taken, so the cost of a chunk does not grow with the length of the stream.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from topics._chunk import ChunkChoice, ChunkDelta, FunctionDelta

__all__ = ["ChoiceState", "normalize_finish_reason", "snake_keys"]

# Provider-specific finish reasons mapped onto OpenAI's vocabulary. Unknown values are
# kept as they are (never mapped to "stop"); "error" stays "error".
_FINISH_MAP: dict[str, str] = {
    "model_length": "length",
    "max_tokens": "length",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "eos": "stop",
    "tool_use": "tool_calls",
}

_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


def normalize_finish_reason(raw: str) -> str:
    """The OpenAI-vocabulary finish reason for a provider's raw value."""
    return _FINISH_MAP.get(raw, raw)


def snake_keys(value: Any) -> Any:
    """Recursively turn camelCase dict keys into snake_case (usage details of TS gateways)."""
    if isinstance(value, dict):
        return {_CAMEL.sub(r"_\1", k).lower(): snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_keys(v) for v in value]
    return value


def _args_piece(arguments: dict[str, Any] | list[Any]) -> str:
    # Mistral sends complete arguments as a JSON object: serialize to the OpenAI string form.
    return json.dumps(arguments, ensure_ascii=False)


class _Call:
    """One tool call (or the legacy function_call) being assembled."""

    __slots__ = ("args", "extra", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}

    def merge_fragment(self, frag: dict[str, Any]) -> None:
        """One tool-call fragment (a plain dict: see :class:`topics.ToolCallDelta`)."""
        for key, value in frag.items():
            if key == "function":
                if isinstance(value, dict):
                    self._merge_function(value.get("name"), value.get("arguments"))
            elif key == "id":
                if value and not self.id and isinstance(value, str):
                    self.id = value
            elif key == "type":
                if value and not self.type and isinstance(value, str):
                    self.type = value
            elif key != "index" and value is not None:
                self.extra[key] = value

    def merge_function(self, fn: FunctionDelta) -> None:
        """A legacy ``function_call`` fragment."""
        self._merge_function(fn.name, fn.arguments)

    def _merge_function(self, name: Any, args: Any) -> None:
        if name and not self.name and isinstance(name, str):
            self.name = name
        if args:
            if isinstance(args, str):
                self.args.append(args)
            elif isinstance(args, dict | list):
                self.args.append(_args_piece(args))

    def function_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": "".join(self.args)}

    def tool_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "id": self.id,
            "type": self.type or "function",
            "function": self.function_dict(),
        }


def _mark(item: Any) -> str:
    return json.dumps(item, sort_keys=True, ensure_ascii=False, default=str)


class ChoiceState:
    """Everything known about one choice (``index``) of a completion."""

    __slots__ = (
        "annotation_marks",
        "annotations",
        "audio_data",
        "audio_expires_at",
        "audio_id",
        "audio_transcript",
        "calls",
        "calls_by_index",
        "content",
        "content_parts",
        "extra",
        "finish_reason",
        "function_call",
        "index",
        "last_call",
        "logprobs_content",
        "logprobs_refusal",
        "message_extra",
        "native_finish_reason",
        "reasoning",
        "reasoning_details",
        "refusal",
        "role",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.reasoning_details: dict[int, dict[str, Any]] = {}
        self.content_parts: list[Any] = []
        self.calls: list[_Call] = []
        self.calls_by_index: dict[float, _Call] = {}
        self.last_call: _Call | None = None
        self.function_call: _Call | None = None
        self.audio_id: str | None = None
        self.audio_data: list[bytes] = []
        self.audio_transcript: list[str] = []
        self.audio_expires_at: int | None = None
        self.annotations: list[Any] = []
        self.annotation_marks: set[str] = set()
        self.logprobs_content: list[Any] = []
        self.logprobs_refusal: list[Any] = []
        self.finish_reason: str | None = None
        self.native_finish_reason: str | None = None
        self.extra: dict[str, Any] = {}
        self.message_extra: dict[str, Any] = {}

    # -- applying one chunk's choice --------------------------------------------------
    def apply(self, choice: ChunkChoice) -> None:
        delta = choice.delta
        if delta is not None:
            self._apply_delta(delta)
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        if choice.native_finish_reason:
            self.native_finish_reason = choice.native_finish_reason
        lp = choice.logprobs
        if lp is not None:
            if lp.content:
                self.logprobs_content.extend(lp.content)
            if lp.refusal:
                self.logprobs_refusal.extend(lp.refusal)
        extra = choice.__pydantic_extra__
        if extra:
            # content_filter_results, stop_reason (vLLM) ...: last value wins, never joined.
            for key, value in extra.items():
                if key != "p" and value is not None:
                    self.extra[key] = value

    def _apply_delta(self, delta: ChunkDelta) -> None:
        if delta.role and self.role is None:
            self.role = delta.role
        content = delta.content
        if content:
            if isinstance(content, str):
                self.content.append(content)
            else:
                self._apply_parts(content)
        if delta.refusal:
            self.refusal.append(delta.refusal)
        if delta.reasoning or delta.reasoning_content:
            self._apply_reasoning(delta.reasoning, delta.reasoning_content)
        if delta.reasoning_details:
            self._apply_reasoning_details(delta.reasoning_details)
        if delta.tool_calls:
            for frag in delta.tool_calls:
                self._apply_tool_call(frag)
        if delta.function_call is not None:
            if self.function_call is None:
                self.function_call = _Call()
            self.function_call.merge_function(delta.function_call)
        if delta.audio is not None:
            self._apply_audio(delta)
        if delta.annotations:
            for item in delta.annotations:
                mark = _mark(item)
                if mark not in self.annotation_marks:
                    self.annotation_marks.add(mark)
                    self.annotations.append(item)
        extra = delta.__pydantic_extra__
        if extra:
            for key, value in extra.items():
                if key not in ("p", "obfuscation") and value is not None:
                    self.message_extra[key] = value

    def _apply_reasoning(self, reasoning: str | None, reasoning_content: str | None) -> None:
        # One field: vLLM sends the same text in both names; say it once.
        if reasoning_content:
            self.reasoning.append(reasoning_content)
            if reasoning and reasoning != reasoning_content:
                self.reasoning.append(reasoning)
        elif reasoning:
            self.reasoning.append(reasoning)

    def _apply_parts(self, parts: list[Any]) -> None:
        for part in parts:
            if not isinstance(part, dict):
                if isinstance(part, str):
                    self.content.append(part)
                else:
                    self.content_parts.append(part)
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                self.content.append(part["text"])
            elif kind == "thinking":
                self._apply_thinking(part.get("thinking"))
            else:
                self.content_parts.append(part)

    def _apply_thinking(self, thinking: Any) -> None:
        if isinstance(thinking, str):
            self.reasoning.append(thinking)
        elif isinstance(thinking, list):
            for item in thinking:
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    self.reasoning.append(item["text"])
                elif isinstance(item, str):
                    self.reasoning.append(item)

    def _apply_reasoning_details(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            idx = item.get("index")
            key = idx if isinstance(idx, int) else len(self.reasoning_details)
            slot = self.reasoning_details.get(key)
            if slot is None:
                slot = self.reasoning_details[key] = {"_pieces": {}}
            pieces: dict[str, list[str]] = slot["_pieces"]
            for name, value in item.items():
                if value is None:
                    continue
                if name in ("text", "summary", "data") and isinstance(value, str):
                    pieces.setdefault(name, []).append(value)
                elif name == "signature":
                    slot[name] = value  # arrives late: fills in (last non-null wins)
                elif name not in slot:
                    slot[name] = value  # type / format / id / index: first value kept

    def _apply_tool_call(self, frag: dict[str, Any]) -> None:
        call: _Call | None
        index = frag.get("index")
        fid = frag.get("id")
        if not isinstance(fid, str):
            fid = None
        if isinstance(index, int | float) and not isinstance(index, bool):
            call = self.calls_by_index.get(index)
            if call is not None and fid and call.id and fid != call.id:
                call = None  # a new call reusing an index (Mistral sends every call at 0)
            if call is None:
                call = self._new_call()
                self.calls_by_index[index] = call
        elif fid:
            call = next((c for c in self.calls if c.id == fid), None) or self._new_call()
        else:
            # No index and no id: continue the call being streamed, if there is one.
            call = self.last_call or self._new_call()
        call.merge_fragment(frag)
        self.last_call = call

    def _new_call(self) -> _Call:
        call = _Call()
        self.calls.append(call)
        return call

    def _apply_audio(self, delta: ChunkDelta) -> None:
        audio = delta.audio
        assert audio is not None
        if audio.id and self.audio_id is None:
            self.audio_id = audio.id
        if audio.expires_at is not None and self.audio_expires_at is None:
            self.audio_expires_at = audio.expires_at
        if audio.data:
            try:
                self.audio_data.append(base64.b64decode(audio.data, validate=False))
            except (binascii.Error, ValueError):
                self.audio_data.append(audio.data.encode())
        if audio.transcript:
            self.audio_transcript.append(audio.transcript)

    # -- reading ------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {**self.message_extra, "role": self.role or "assistant"}
        msg["content"] = "".join(self.content) if self.content else None
        if self.refusal:
            msg["refusal"] = "".join(self.refusal)
        if self.reasoning:
            msg["reasoning"] = "".join(self.reasoning)
        if self.reasoning_details:
            msg["reasoning_details"] = [
                self._detail_dict(self.reasoning_details[k]) for k in sorted(self.reasoning_details)
            ]
        if self.calls:
            msg["tool_calls"] = [c.tool_dict() for c in self.calls]
        if self.function_call is not None:
            msg["function_call"] = self.function_call.function_dict()
        if self.audio_id or self.audio_data or self.audio_transcript:
            msg["audio"] = {
                "id": self.audio_id,
                "data": base64.b64encode(b"".join(self.audio_data)).decode(),
                "transcript": "".join(self.audio_transcript),
                "expires_at": self.audio_expires_at,
            }
        if self.annotations:
            msg["annotations"] = list(self.annotations)
        if self.content_parts:
            msg["content_parts"] = list(self.content_parts)
        return msg

    @staticmethod
    def _detail_dict(slot: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in slot.items() if k != "_pieces"}
        for name, pieces in slot["_pieces"].items():
            out[name] = "".join(pieces)
        return out

    def choice(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "index": self.index, "message": self.message()}
        raw = self.finish_reason
        if raw is not None:
            normalized = normalize_finish_reason(raw)
            out["finish_reason"] = normalized
            if normalized != raw:
                out["raw_finish_reason"] = raw
        else:
            out["finish_reason"] = None
        if self.native_finish_reason is not None:
            out["native_finish_reason"] = self.native_finish_reason
        if self.logprobs_content or self.logprobs_refusal:
            out["logprobs"] = {
                "content": list(self.logprobs_content) if self.logprobs_content else None,
                "refusal": list(self.logprobs_refusal) if self.logprobs_refusal else None,
            }
        return out
