from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from processor.cli import app
from processor.synthetic import PROVIDERS, interleave, make_stream

runner = CliRunner()


def _capture(tmp_path: Path, sse: bool) -> tuple[Path, list[str]]:
    rng = random.Random(3)
    streams = [make_stream(kind, f"cmpl-{i}", rng) for i, kind in enumerate(sorted(PROVIDERS))]
    lines = []
    for _, _, chunk in interleave(streams, rng):
        body = json.dumps(chunk)
        lines.append(f"data: {body}\n\n" if sse else body + "\n")
    if sse:
        lines.append(": keep-alive\n\ndata: [DONE]\n\n")
    path = tmp_path / ("capture.sse" if sse else "capture.jsonl")
    path.write_text("".join(lines))
    return path, [s.completion_id for s in streams]


def test_assemble_sse_capture_interleaved(tmp_path: Path) -> None:
    path, ids = _capture(tmp_path, sse=True)
    result = runner.invoke(app, ["assemble", str(path)])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["id"] for r in out) == sorted(ids)
    assert all(r["object"] == "chat.completion" for r in out)


def test_assemble_jsonl_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id":"b","choices":[{"index":0,"delta":{"content":"1"}}]}\n'
        '{"id":"a","choices":[{"index":0,"delta":{"content":"2"},"finish_reason":"stop"}]}\n'
        '{"id":"b","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n'
    )
    result = runner.invoke(app, ["assemble", str(path)])
    assert result.exit_code == 0
    assert [json.loads(x)["id"] for x in result.stdout.splitlines()] == ["b", "a"]


def test_bad_lines_reported_rest_assembled_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id":"a","choices":[{"index":0,"delta":{"content":"x"}}]}\nnope\n{"x": 1}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "processor", "assemble", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["id"] == "a"
    assert "line 2:" in proc.stderr
    assert "line 3:" in proc.stderr
    assert "'id'" in proc.stderr


def test_empty_input_prints_nothing_exit_0() -> None:
    result = runner.invoke(app, ["assemble", "-"], input="")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    result = runner.invoke(app, ["assemble", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_pretty(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"id":"a","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}\n'
    )
    result = runner.invoke(app, ["assemble", "--pretty", str(path)])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["choices"][0]["message"]["content"] == "x"
    assert "\n  " in result.stdout
