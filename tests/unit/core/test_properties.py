"""Property: any duplication and reordering of a sequenced stream assembles to the same
response as the original (only the duplicates counter differs, by exactly the copies)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.core import Assembler, parse_chunk

_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A realistic sequenced stream: n choices, text, reasoning, tool-call fragments, usage."""
    n_choices = draw(st.integers(1, 3))
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 25))):
        index = draw(st.integers(0, n_choices - 1))
        kind = draw(st.sampled_from(["content", "reasoning", "tool", "refusal"]))
        if kind == "tool":
            d: dict[str, Any] = {
                "tool_calls": [
                    {
                        "index": draw(st.integers(0, 2)),
                        "id": draw(st.sampled_from([None, "call_a", "call_b"])),
                        "function": {
                            "name": draw(st.sampled_from([None, "f"])),
                            "arguments": draw(_TEXT),
                        },
                    }
                ]
            }
        else:
            d = {kind: draw(_TEXT)}
        chunk: dict[str, Any] = {
            "id": "cmpl",
            "model": "m",
            "choices": [{"index": index, "delta": d}],
        }
        if draw(st.booleans()) and draw(st.booleans()):
            p, c = draw(st.integers(0, 50)), draw(st.integers(0, 50))
            chunk["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        out.append(chunk)
    out.append(
        {
            "id": "cmpl",
            "choices": [
                {"index": i, "delta": {}, "finish_reason": "stop"} for i in range(n_choices)
            ],
        }
    )
    return out


def _assemble(order: list[int], chunks: list[dict[str, Any]]) -> dict[str, Any]:
    asm = Assembler()
    for seq in order:
        asm.add(parse_chunk(chunks[seq]), seq=seq)
    return asm.finish().model_dump()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), chunks=streams())
def test_any_duplication_and_reordering_assembles_identically(
    data: st.DataObject, chunks: list[dict[str, Any]]
) -> None:
    original = _assemble(list(range(len(chunks))), chunks)
    copies = data.draw(
        st.lists(st.integers(0, len(chunks) - 1), max_size=len(chunks)), label="dups"
    )
    delivered = data.draw(st.permutations(list(range(len(chunks))) + copies), label="order")
    replayed = _assemble(delivered, chunks)
    assert replayed["chunkstitch"].pop("duplicates_dropped") == len(copies)
    assert original["chunkstitch"].pop("duplicates_dropped") == 0
    assert replayed == original


@settings(max_examples=100, deadline=None)
@given(chunks=streams(), cut=st.integers(0, 30))
def test_snapshot_is_a_prefix_of_the_final_text(chunks: list[dict[str, Any]], cut: int) -> None:
    asm = Assembler()
    cut = min(cut, len(chunks))
    for seq in range(cut):
        asm.add(parse_chunk(chunks[seq]), seq=seq)
    early = asm.snapshot().model_dump()
    for seq in range(cut, len(chunks)):
        asm.add(parse_chunk(chunks[seq]), seq=seq)
    final = asm.finish().model_dump()
    for before in early["choices"]:
        after = next(c for c in final["choices"] if c["index"] == before["index"])
        assert (after["message"]["content"] or "").startswith(before["message"]["content"] or "")
