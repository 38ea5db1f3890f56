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


def test_empty_input_is_an_error_that_says_so(tmp_path: Path) -> None:
    """Issue 15: an empty file printed nothing and exited 0 (a wrong file, a failed
    capture went unnoticed). No chunk at all -> exit 1 and one line saying so."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["assemble", str(empty)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"no chunks in {empty} (empty input)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    only_done = runner.invoke(app, ["assemble", "-"], input=": keep-alive\n\ndata: [DONE]\n\n")
    assert only_done.exit_code == 1
    assert "no chunks in stdin" in only_done.stderr


def test_directory_is_named_as_a_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["assemble", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a directory" in result.stderr
    assert "no such file" not in result.stderr


def test_no_argument_on_a_terminal_does_not_wait_silently() -> None:
    """With a real terminal as stdin: exits at once with what to pass (no hang)."""
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "processor", "assemble"],
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert proc.returncode == 2
    assert "no input" in proc.stderr
    assert "chunkstitch assemble FILE" in proc.stderr


def test_no_argument_with_piped_input_reads_stdin() -> None:
    line = '{"id":"p","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}\n'
    result = runner.invoke(app, ["assemble"], input=line)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "p"


def test_single_assembles_a_groq_compound_capture_as_one_completion(tmp_path: Path) -> None:
    """Groq compound models give every chunk of one answer a new id (the last "stub")."""
    words = ["Look", "ing", " it", " up", "."]
    lines = [
        json.dumps({"id": f"chatcmpl-{i}", "choices": [{"index": 0, "delta": {"content": w}}]})
        for i, w in enumerate(words)
    ]
    lines.append(
        json.dumps({"id": "stub", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    )
    path = tmp_path / "groq.jsonl"
    path.write_text("\n".join(lines) + "\n")
    split = runner.invoke(app, ["assemble", str(path)])
    assert len(split.stdout.splitlines()) == 6  # grouped by id: one per chunk
    for flag in ("--single", "--one-stream"):
        result = runner.invoke(app, ["assemble", flag, str(path)])
        assert result.exit_code == 0, result.output
        (line,) = result.stdout.splitlines()
        response = json.loads(line)
        assert response["id"] == "chatcmpl-0"
        assert response["choices"][0]["message"]["content"] == "Looking it up."
        assert response["chunkstitch"]["status"] == "complete"
        assert response["chunkstitch"]["chunk_count"] == 6


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


def test_console_script_fast_path_skips_typer_and_matches_the_typer_command(
    tmp_path: Path,
) -> None:
    """`chunkstitch assemble FILE` runs the assembler without importing typer or the
    other commands (issue 14: import and teardown were a quarter of the CLI's time);
    the typer command gives byte-identical output and the same exit code."""
    path, _ = _capture(tmp_path, sse=False)
    with path.open("a") as f:
        f.write("nope\n")
    fast = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "processor", "assemble", str(path)],
        capture_output=True,
        check=False,
    )
    imported = {line.split("|")[-1].strip() for line in fast.stderr.decode().splitlines()}
    assert "typer" not in imported
    assert "aiokafka" not in imported
    assert "processor.cli" not in imported
    via_typer = runner.invoke(app, ["assemble", str(path)])
    assert fast.returncode == via_typer.exit_code == 1
    assert fast.stdout.decode() == via_typer.stdout
    assert "not a JSON line" in fast.stderr.decode()
    # anything the fast path does not know goes to typer (help, unknown options)
    helped = subprocess.run(
        [sys.executable, "-m", "processor", "assemble", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert helped.returncode == 0
    assert "--one-stream" in helped.stdout
