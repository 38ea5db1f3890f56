"""The merge semantics of issue 4, one (or more) named test per rule."""

from __future__ import annotations

import base64
import json

import pytest

from processor.core import Assembler, assemble_many, parse_chunk

from ._util import chunk, delta, message, run


# 1. Text fields are concatenated; nothing else is.
def test_semantics_01_text_fields_concatenated() -> None:
    resp = run(
        chunk("c1", delta(role="assistant", content="Hel", refusal="I ", reasoning="thi")),
        chunk("c1", delta(content="lo", refusal="can't", reasoning="nk")),
        chunk("c1", delta(audio={"transcript": "he"}, function_call={"name": "f"})),
        chunk("c1", delta(audio={"transcript": "y"}, function_call={"arguments": '{"a"'})),
        chunk("c1", delta(finish="stop", function_call={"arguments": ":1}"})),
    )
    msg = message(resp)
    assert msg["content"] == "Hello"
    assert msg["refusal"] == "I can't"
    assert msg["reasoning"] == "think"
    assert msg["audio"]["transcript"] == "hey"
    assert msg["function_call"] == {"name": "f", "arguments": '{"a":1}'}


def test_semantics_01_non_text_fields_never_joined_or_added() -> None:
    resp = run(
        chunk("c1", delta(role="assistant", content="a"), created=100, model="m1"),
        chunk("c1", delta(role="assistant", content="b"), created=200, model="m1"),
        chunk("c1", delta(finish="stop"), created=300, model="m1"),
    )
    assert resp.created == 100
    assert resp.model == "m1"
    assert resp.id == "c1"
    assert message(resp)["role"] == "assistant"


# 2. Choices grouped by index, any order and interleaving.
def test_semantics_02_choices_grouped_by_index_interleaved() -> None:
    resp = run(
        chunk("c1", delta(2, content="two-")),
        chunk("c1", delta(0, content="zero-"), delta(2, content="b")),
        chunk("c1", delta(0, content="a", finish="length")),
        chunk("c1", delta(2, finish="stop")),
    )
    assert [c.index for c in resp.choices] == [0, 2]
    assert message(resp, 0)["content"] == "zero-a"
    assert message(resp, 2)["content"] == "two-b"
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[1].finish_reason == "stop"
    assert resp.chunkstitch.status == "complete"


# 3. role: first non-empty value.
def test_semantics_03_role_repeated_on_every_delta_stays_assistant() -> None:
    resp = run(*[chunk("c1", delta(role="assistant", content=str(i))) for i in range(5)])
    assert message(resp)["role"] == "assistant"
    assert message(resp)["content"] == "01234"


def test_semantics_03_role_first_non_empty() -> None:
    resp = run(chunk("c1", delta(role="", content="x")), chunk("c1", delta(role="assistant")))
    assert message(resp)["role"] == "assistant"


# 4. Tool calls.
def test_semantics_04_tool_calls_merged_by_index() -> None:
    resp = run(
        chunk("c1", delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "f"}}])),
        chunk("c1", delta(tool_calls=[{"index": 1, "id": "b", "function": {"name": "g"}}])),
        chunk("c1", delta(tool_calls=[{"index": 0, "function": {"arguments": '{"x":'}}])),
        chunk("c1", delta(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}])),
        chunk("c1", delta(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}])),
        chunk("c1", delta(finish="tool_calls")),
    )
    calls = message(resp)["tool_calls"]
    assert calls == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


def test_semantics_04_repeated_id_type_name_not_concatenated() -> None:
    frag = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get"}}
    resp = run(
        chunk("c1", delta(tool_calls=[{**frag, "function": {"name": "get", "arguments": "{"}}])),
        chunk("c1", delta(tool_calls=[{**frag, "function": {"name": "get", "arguments": "}"}}])),
    )
    call = message(resp)["tool_calls"][0]
    assert call == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get", "arguments": "{}"},
    }


def test_semantics_04_same_index_different_id_starts_new_call() -> None:
    resp = run(
        chunk("c1", delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "f"}}])),
        chunk("c1", delta(tool_calls=[{"index": 0, "id": "b", "function": {"name": "g"}}])),
    )
    assert [c["id"] for c in message(resp)["tool_calls"]] == ["a", "b"]


def test_semantics_04_delta_without_index_attributed() -> None:
    resp = run(
        chunk("c1", delta(tool_calls=[{"id": "a", "function": {"name": "f", "arguments": "{"}}])),
        chunk("c1", delta(tool_calls=[{"function": {"arguments": "}"}}])),
        chunk("c1", delta(tool_calls=[{"id": "a", "function": {"arguments": ""}}])),
    )
    calls = message(resp)["tool_calls"]
    assert len(calls) == 1
    assert calls[0]["function"] == {"name": "f", "arguments": "{}"}


def test_semantics_04_index_gap_and_missing_id_and_default_type() -> None:
    resp = run(
        chunk("c1", delta(tool_calls=[{"index": 1, "function": {"name": "f", "arguments": "{}"}}]))
    )
    calls = message(resp)["tool_calls"]
    assert calls == [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]


def test_semantics_04_arguments_object_serialized_and_empty_list_harmless() -> None:
    resp = run(
        chunk("c1", delta(content="", tool_calls=[])),
        chunk(
            "c1",
            delta(
                toolCalls=[
                    {"index": 0, "id": "m1", "function": {"name": "f", "arguments": {"q": "é"}}}
                ]
            ),
        ),
        chunk("c1", delta(tool_calls=[], finish="tool_calls")),
    )
    call = message(resp)["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"q": "é"}
    assert len(message(resp)["tool_calls"]) == 1


# 5. Legacy function_call.
def test_semantics_05_legacy_function_call() -> None:
    resp = run(
        chunk("c1", delta(role="assistant", function_call={"name": "lookup", "arguments": ""})),
        chunk("c1", delta(function_call={"arguments": '{"q":'})),
        chunk("c1", delta(finish="function_call", function_call={"arguments": '"x"}'})),
    )
    assert message(resp)["function_call"] == {"name": "lookup", "arguments": '{"q":"x"}'}
    assert resp.choices[0].finish_reason == "function_call"


# 6. Mistral list content.
def test_semantics_06_mistral_list_content() -> None:
    ref = {"type": "reference", "reference_ids": [1, 2]}
    resp = run(
        chunk(
            "c1",
            delta(content=[{"type": "thinking", "thinking": [{"type": "text", "text": "hm"}]}]),
        ),
        chunk("c1", delta(content=[{"type": "text", "text": "Hi"}, ref])),
        chunk("c1", delta(content=[{"type": "text", "text": "!"}], finish="stop")),
    )
    msg = message(resp)
    assert msg["content"] == "Hi!"
    assert msg["reasoning"] == "hm"
    assert msg["content_parts"] == [ref]


# 7. Reasoning.
def test_semantics_07_reasoning_and_reasoning_content_are_one_field() -> None:
    resp = run(
        chunk("c1", delta(reasoning="Let", reasoning_content="Let")),
        chunk("c1", delta(reasoning=" me", reasoning_content=" me")),
        chunk("c1", delta(reasoning_content=" see")),
    )
    assert message(resp)["reasoning"] == "Let me see"


def test_semantics_07_reasoning_details_merge_by_index() -> None:
    resp = run(
        chunk(
            "c1",
            delta(
                reasoning_details=[
                    {"type": "reasoning.text", "index": 0, "text": "a", "format": "x"}
                ]
            ),
        ),
        chunk(
            "c1",
            delta(
                reasoning_details=[
                    {"type": "reasoning.text", "index": 0, "text": "b", "format": "x"}
                ]
            ),
        ),
        chunk(
            "c1",
            delta(
                reasoning_details=[
                    {"type": "reasoning.summary", "index": 1, "summary": "s", "id": "r1"}
                ]
            ),
        ),
        chunk(
            "c1",
            delta(reasoning_details=[{"type": "reasoning.text", "index": 0, "signature": "sig"}]),
        ),
    )
    details = message(resp)["reasoning_details"]
    assert details == [
        {"type": "reasoning.text", "index": 0, "text": "ab", "format": "x", "signature": "sig"},
        {"type": "reasoning.summary", "index": 1, "summary": "s", "id": "r1"},
    ]


# 8. Annotations.
def test_semantics_08_annotations_accumulate_without_duplicates() -> None:
    a = {
        "type": "url_citation",
        "url_citation": {"url": "https://a", "title": "A", "start_index": 0, "end_index": 1},
    }
    b = {
        "type": "url_citation",
        "url_citation": {"url": "https://b", "title": "B", "start_index": 2, "end_index": 3},
    }
    resp = run(chunk("c1", delta(annotations=[a])), chunk("c1", delta(annotations=[a, b])))
    assert message(resp)["annotations"] == [a, b]


# 9. Logprobs.
def test_semantics_09_logprobs_extended_in_order() -> None:
    lp = lambda t: {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []}  # noqa: E731
    resp = run(
        chunk("c1", {"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [lp("a")]}}),
        chunk("c1", {"index": 0, "delta": {"refusal": "n"}, "logprobs": {"refusal": [lp("n")]}}),
        chunk("c1", {"index": 0, "delta": {"content": "b"}, "logprobs": {"content": [lp("b")]}}),
    )
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None
    assert [x["token"] for x in logprobs.content or []] == ["a", "b"]
    assert [x["token"] for x in logprobs.refusal or []] == ["n"]


# 10. Audio.
def test_semantics_10_audio_data_decoded_joined_reencoded() -> None:
    raw = b"\x00\x01\x02\x03\x04\x05\x06"
    parts = [raw[:2], raw[2:5], raw[5:]]
    resp = run(
        *[
            chunk(
                "c1",
                delta(audio={"id": "au_1", "data": base64.b64encode(p).decode(), "expires_at": 99}),
            )
            for p in parts
        ]
    )
    audio = message(resp)["audio"]
    assert base64.b64decode(audio["data"]) == raw
    assert audio["id"] == "au_1"
    assert audio["expires_at"] == 99


# 11. Usage.
def test_semantics_11_cumulative_usage_gives_last_value_not_sum() -> None:
    resp = run(
        *[
            chunk(
                "c1",
                delta(content="x"),
                usage={"prompt_tokens": 5, "completion_tokens": i, "total_tokens": 5 + i},
            )
            for i in range(1, 6)
        ]
    )
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        5,
        5,
        10,
    )


def test_semantics_11_later_chunk_without_usage_never_erases_it() -> None:
    resp = run(
        chunk(
            "c1",
            delta(content="x"),
            usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        ),
        chunk("c1", delta(content="y", finish="stop"), usage=None),
    )
    assert resp.usage is not None
    assert resp.usage.total_tokens == 6


def test_semantics_11_split_usage_keeps_last_non_zero_and_total() -> None:
    resp = run(
        chunk("c1", delta(content="x"), usage={"prompt_tokens": 7, "completion_tokens": 0}),
        chunk(
            "c1",
            delta(finish="stop"),
            usage={
                "prompt_tokens": 0,
                "completion_tokens": 4,
                "total_tokens": 4,
                "cost": 0.0012,
                "is_byok": False,
                "completion_tokens_details": {"reasoning_tokens": 2},
                "server_tool_use": {"web_search_requests": 1},
            },
        ),
    )
    usage = resp.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 4, 11)
    dumped = usage.model_dump()
    assert dumped["cost"] == 0.0012
    assert dumped["is_byok"] is False
    assert dumped["server_tool_use"] == {"web_search_requests": 1}
    assert dumped["completion_tokens_details"] == {"reasoning_tokens": 2}


def test_semantics_11_camelcase_usage_details_emitted_snake_case() -> None:
    resp = run(
        chunk(
            "c1",
            delta(content="x", finish="stop"),
            usage={
                "promptTokens": 9,
                "completionTokens": 12,
                "totalTokens": 21,
                "promptTokensDetails": {"cachedTokens": 10, "audioTokens": 0},
            },
        )
    )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens_details == {"cached_tokens": 10, "audio_tokens": 0}


def test_semantics_11_no_usage_reported_plainly() -> None:
    resp = run(chunk("c1", delta(content="x", finish="stop")))
    assert resp.usage is None
    assert resp.chunkstitch.usage_reported is False


def _groq(usage: dict[str, object]) -> dict[str, object]:
    return {"id": "req_01", "usage": usage}


GROQ_USAGE = {
    "queue_time": 0.017,
    "prompt_tokens": 12,
    "prompt_time": 0.0015,
    "completion_tokens": 22,
    "completion_time": 0.018,
    "total_tokens": 34,
    "total_time": 0.0196,
}


def test_semantics_11_groq_x_groq_usage_is_the_usage_when_no_top_level_usage() -> None:
    """Older Groq models report usage only under ``x_groq.usage``: it is counted."""
    resp = run(
        chunk("c1", delta(role="assistant", content="hi"), x_groq={"id": "req_01"}),
        chunk("c1", delta(finish="stop"), x_groq=_groq(GROQ_USAGE)),
    )
    assert resp.chunkstitch.usage_reported is True
    assert resp.usage is not None
    usage = resp.usage.model_dump()
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        12,
        22,
        34,
    )
    assert usage["queue_time"] == 0.017  # Groq's timings kept as provider extras
    assert json.loads(resp.to_json())["x_groq"]["id"] == "req_01"  # the extra stays too


def test_semantics_11_top_level_usage_wins_over_x_groq_usage() -> None:
    resp = run(
        chunk("c1", delta(content="hi"), x_groq=_groq(GROQ_USAGE)),
        chunk(
            "c1",
            delta(finish="stop"),
            usage={"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        ),
    )
    assert resp.usage is not None
    assert resp.usage.total_tokens == 11
    assert "queue_time" not in resp.usage.model_dump()


def test_semantics_11_unreadable_x_groq_usage_is_only_kept_as_an_extra() -> None:
    resp = run(chunk("c1", delta(finish="stop"), x_groq=_groq({"prompt_tokens": "many"})))
    assert resp.usage is None
    assert resp.chunkstitch.usage_reported is False
    assert json.loads(resp.to_json())["x_groq"]["usage"] == {"prompt_tokens": "many"}


# 12. Finish.
def test_semantics_12_finish_reason_normalized_raw_kept() -> None:
    resp = run(chunk("c1", delta(content="x", finish="model_length")))
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].raw_finish_reason == "model_length"


def test_semantics_12_unknown_finish_reason_kept_not_mapped_to_stop() -> None:
    resp = run(chunk("c1", delta(content="x", finish="recitation")))
    assert resp.choices[0].finish_reason == "recitation"


def test_semantics_12_error_finish_stays_error() -> None:
    resp = run(chunk("c1", delta(content="x", finish="error")))
    assert resp.choices[0].finish_reason == "error"
    assert resp.chunkstitch.status == "error"


def test_semantics_12_cut_off_stream_is_incomplete_never_stop() -> None:
    resp = run(chunk("c1", delta(content="partial")))
    assert resp.choices[0].finish_reason is None
    assert resp.chunkstitch.status == "incomplete"
    assert "finish_reason" in (resp.chunkstitch.reason or "")


def test_semantics_12_openrouter_midstream_error_and_native_reason_kept() -> None:
    err = {"code": 502, "message": "upstream overloaded"}
    resp = run(
        chunk("c1", delta(content="par")),
        chunk(
            "c1",
            {
                "index": 0,
                "delta": {"content": ""},
                "finish_reason": "error",
                "native_finish_reason": "overloaded",
            },
            error=err,
        ),
    )
    assert resp.error == err
    assert resp.choices[0].native_finish_reason == "overloaded"
    assert resp.chunkstitch.status == "error"
    assert "upstream overloaded" in (resp.chunkstitch.reason or "")


# 13. Metadata.
def test_semantics_13_metadata_first_non_null_and_later_model() -> None:
    resp = run(
        chunk("c1", delta(content="a"), model="gpt-4o-router", created=5, system_fingerprint=None),
        chunk(
            "c1",
            delta(content="b"),
            model="gpt-4o-2024-08-06",
            created=6,
            system_fingerprint="fp_1",
            service_tier="default",
            provider="Azure",
        ),
        chunk(
            "c1",
            delta(finish="stop"),
            model="gpt-4o-2024-08-06",
            system_fingerprint="fp_2",
            service_tier="flex",
            provider="Other",
        ),
    )
    assert resp.model == "gpt-4o-2024-08-06"
    assert resp.created == 5
    assert (resp.system_fingerprint, resp.service_tier, resp.provider) == (
        "fp_1",
        "default",
        "Azure",
    )


# 14. Robustness.
def test_semantics_14_azure_placeholder_not_a_completion() -> None:
    placeholder = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
    }
    chunks = [
        parse_chunk(placeholder),
        parse_chunk(
            chunk(
                "c1",
                {
                    "index": 0,
                    "delta": {"content": "hi"},
                    "content_filter_results": {"hate": {"filtered": False}},
                },
            )
        ),
        parse_chunk(chunk("c1", {"index": 0, "delta": None, "finish_reason": "stop"})),
    ]
    responses = assemble_many(chunks)
    assert len(responses) == 1
    resp = responses[0]
    assert resp.id == "c1"
    assert message(resp)["content"] == "hi"
    assert resp.model_dump()["prompt_filter_results"][0]["prompt_index"] == 0
    assert resp.choices[0].model_dump()["content_filter_results"] == {"hate": {"filtered": False}}


def test_semantics_14_missing_or_null_delta_and_padding_fields() -> None:
    resp = run(
        chunk("c1", {"index": 0}, obfuscation="xk2"),
        chunk("c1", {"index": 0, "delta": None}),
        chunk("c1", {"index": 0, "delta": {"content": "ok", "p": "abcdef"}}, obfuscation="zz"),
        chunk("c1", {"index": 0, "delta": {}, "finish_reason": "stop"}),
    )
    dumped = resp.model_dump()
    assert message(resp)["content"] == "ok"
    assert "obfuscation" not in dumped
    assert "p" not in dumped["choices"][0]["message"]


# 15. Order and duplicates (the property test is in test_properties.py).
def test_semantics_15_duplicate_seq_dropped_and_reordered_merged_in_order() -> None:
    raws = [chunk("c1", delta(content=t)) for t in ("a", "b", "c")]
    raws.append(chunk("c1", delta(finish="stop")))
    asm = Assembler()
    for seq in (2, 0, 0, 3, 1, 2):
        asm.add(parse_chunk(raws[seq]), seq=seq)
    resp = asm.finish()
    assert message(resp)["content"] == "abc"
    assert resp.chunkstitch.duplicates_dropped == 2
    assert resp.chunkstitch.chunk_count == 4
    assert resp.chunkstitch.status == "complete"


def test_semantics_15_gap_in_sequence_is_incomplete() -> None:
    asm = Assembler()
    asm.add(parse_chunk(chunk("c1", delta(content="a"))), seq=0)
    asm.add(parse_chunk(chunk("c1", delta(content="c", finish="stop"))), seq=2)
    assert not asm.has_all_seqs_below(3)
    resp = asm.finish()
    assert message(resp)["content"] == "ac"
    assert resp.chunkstitch.status == "incomplete"
    assert resp.chunkstitch.missing_chunks == 1


def test_semantics_15_chunks_lost_after_the_last_one_count_as_missing() -> None:
    """Issue 15: a stream of 21 chunks whose last one never arrived (the gateway published
    "[DONE]" as seq 20: a dead letter). The idle-timeout reason said "1 of 21 chunks never
    arrived" while missing_chunks said 0: the count only saw gaps *below* the highest seq
    that arrived. With the end marker's count both say the same."""
    from processor.core import DetectionPolicy, StreamClock, decide

    asm = Assembler()
    for seq in range(20):
        asm.add(parse_chunk(chunk("c1", delta(content="x"))), seq=seq)
    clock = StreamClock(opened_at=0, last_chunk_at=0, end_count=21, sequenced=True)
    decision = decide(asm, clock, 31.0, DetectionPolicy(idle_timeout_s=30))
    assert decision is not None
    assert "1 of 21 chunks never arrived" in (decision.reason or "")
    assert asm.missing_below(21) == 1
    resp = asm.finish(status=decision.status, reason=decision.reason, expected=21)
    assert resp.chunkstitch.missing_chunks == 1
    assert resp.chunkstitch.status == "incomplete"


def test_semantics_15_missing_below_counts_gaps_and_tail_once() -> None:
    asm = Assembler()
    for seq in (0, 1, 3):  # 2 is a gap, 4 is lost at the tail
        asm.add(parse_chunk(chunk("c1", delta(content="x"))), seq=seq)
    assert asm.missing_chunks == 1  # without the end marker only the gap is known
    assert asm.missing_below(5) == 2
    assert asm.finish(expected=5).chunkstitch.missing_chunks == 2
    unsequenced = Assembler()
    unsequenced.add(parse_chunk(chunk("c1", delta(content="x"))))
    assert unsequenced.missing_below(3) == 2


# 16. OpenAI validation and chunkstitch metadata.
def test_semantics_16_validates_as_openai_chat_completion() -> None:
    from openai.types.chat import ChatCompletion as OpenAIChatCompletion

    resp = run(
        chunk("c1", delta(role="assistant", content="Hi"), model="gpt-4o", created=1700000000),
        chunk(
            "c1",
            delta(
                tool_calls=[
                    {
                        "index": 0,
                        "id": "t",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ]
            ),
        ),
        chunk(
            "c1",
            delta(finish="tool_calls"),
            usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        ),
    )
    parsed = OpenAIChatCompletion.model_validate(json.loads(resp.to_json()))
    assert parsed.choices[0].message.content == "Hi"
    assert parsed.choices[0].finish_reason == "tool_calls"
    meta = json.loads(resp.to_json())["chunkstitch"]
    assert meta == {
        "status": "complete",
        "chunk_count": 3,
        "duplicates_dropped": 0,
        "missing_chunks": 0,
        "usage_reported": True,
    }


def test_semantics_16_no_null_keys_that_say_nothing() -> None:
    """Issue 15: responses carried "error": null and "provider": null. chunkstitch's own
    optional fields are left out when null in every serialization; the response still
    validates as OpenAI's ChatCompletion from model_dump_json() too."""
    from openai.types.chat import ChatCompletion as OpenAIChatCompletion

    resp = run(chunk("c1", delta(role="assistant", content="Hi", finish="stop"), model="m"))
    for body in (json.loads(resp.model_dump_json()), resp.model_dump(), json.loads(resp.to_json())):
        assert "error" not in body
        assert "provider" not in body
        assert "reason" not in body["chunkstitch"]
        assert "tenant" not in body["chunkstitch"]
        assert "raw_finish_reason" not in body["choices"][0]
        assert "reasoning" not in body["choices"][0]["message"]
    parsed = OpenAIChatCompletion.model_validate_json(resp.model_dump_json())
    assert parsed.choices[0].message.content == "Hi"
    errored = run(chunk("c1", delta(content="x"), error={"message": "boom"}, provider="Groq"))
    body = json.loads(errored.model_dump_json())
    assert body["error"] == {"message": "boom"}
    assert body["provider"] == "Groq"


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [
        (b"not json", "not_json", None),
        (b"[1, 2]", "not_an_object", None),
        (b'{"object": "chat.completion.chunk"}', "no_id", "id"),
        (b'{"id": "x", "choices": "nope"}', "wrong_type", "choices"),
        (b'{"id": "x", "choices": [{"index": 0, "delta": 5}]}', "wrong_type", "choices[0].delta"),
        (b'{"id": 12, "choices": []}', "wrong_type", "id"),
    ],
)
def test_rejection_names_the_field(raw: bytes, reason: str, field: str | None) -> None:
    from processor.core import ChunkRejected

    with pytest.raises(ChunkRejected) as info:
        parse_chunk(raw)
    assert info.value.reason == reason
    assert info.value.field == field
    if field:
        assert field in str(info.value)


def test_unknown_fields_kept_and_camelcase_accepted() -> None:
    resp = run(
        {
            "id": "c1",
            "choices": [
                {"index": 0, "delta": {"content": "x", "customThing": 1}, "finishReason": "stop"}
            ],
            "systemFingerprint": "fp",
            "x_vendor": {"a": 1},
        }
    )
    dumped = resp.model_dump(exclude_none=True)
    assert dumped["system_fingerprint"] == "fp"
    assert dumped["x_vendor"] == {"a": 1}
    assert dumped["choices"][0]["message"]["customThing"] == 1
    assert dumped["choices"][0]["finish_reason"] == "stop"


def test_cost_per_chunk_does_not_rejoin_text() -> None:
    """snapshot() is the only place text is joined: add() keeps pieces."""
    asm = Assembler()
    for i in range(1000):
        asm.add(parse_chunk(chunk("c1", delta(content=str(i % 10)))))
    assert asm.chunk_count == 1000
    assert len(message(asm.snapshot())["content"]) == 1000
    asm.add(parse_chunk(chunk("c1", delta(content="!", finish="stop"))))
    assert message(asm.finish())["content"].endswith("9!")
