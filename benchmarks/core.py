"""Assembler speed: chunkstitch's validated merge vs a json.loads floor and openai-python.

Streams: a 500-chunk text stream and a 200-chunk tool-call stream (OpenAI shape). For each:
  floor     json.loads + string concatenation of the same chunks (no validation, no rules);
  chunkstitch  parse_chunk (pydantic validation) + Assembler.add + finish();
  openai    openai-python's ChatCompletionStreamState.handle_chunk + get_final_completion,
            with chunks built the way the SDK builds them (construct_type after json.loads).
Targets (issue 4): chunkstitch >= 0.5x floor, >= 3x openai-python.

Then the whole offline assembler as users run it (issue 14): ``chunkstitch assemble FILE``
as a subprocess on an interleaved 120,000-chunk JSON Lines file (600 streams of 200
chunks, 50 streams live at a time), next to a floor subprocess that json.loads every
line and joins each completion's text (``python FLOOR FILE``, the least any Python tool
must do). Both include interpreter start, imports, reading, writing and exit; output to
/dev/null. Rounds alternate floor and CLI so that a busy neighbour slows both alike;
reported per round as wall-clock and CPU (user+sys) ratios floor/CLI, with the median
and the spread. Target: >= 0.5x of the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from processor.core import Assembler, parse_chunk
from processor.synthetic import text_stream, tool_stream


def _floor(raws: list[bytes]) -> None:
    text = ""
    args = ""
    for raw in raws:
        data = json.loads(raw)
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                args += (call.get("function") or {}).get("arguments") or ""


def _chunkstitch(raws: list[bytes]) -> None:
    asm = Assembler()
    for raw in raws:
        asm.add(parse_chunk(raw), size=len(raw))
    asm.finish()


def _openai(raws: list[bytes]) -> None:
    from openai._models import construct_type
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state: ChatCompletionStreamState[object] = ChatCompletionStreamState()
    for raw in raws:
        chunk = construct_type(type_=ChatCompletionChunk, value=json.loads(raw))
        state.handle_chunk(chunk)  # type: ignore[arg-type]
    state.get_final_completion()


def _round(fn: Callable[[list[bytes]], None], raws: list[bytes], seconds: float) -> float:
    """chunks/second of ``fn`` over ``raws``, repeated for about ``seconds`` (bounded)."""
    n = 0
    start = time.perf_counter()
    while True:
        fn(raws)
        n += 1
        now = time.perf_counter()
        if now - start >= seconds or n >= 10_000:
            return n * len(raws) / (now - start)


IMPLS: dict[str, Callable[[list[bytes]], None]] = {
    "floor": _floor,
    "chunkstitch": _chunkstitch,
    "openai": _openai,
}


def measure(raws: list[bytes], seconds: float, rounds: int = 5) -> dict[str, float]:
    """Best rate per implementation; rounds interleave the implementations so that a noisy
    neighbour slows all of them alike."""
    best = dict.fromkeys(IMPLS, 0.0)
    for _ in range(rounds):
        for label, fn in IMPLS.items():
            best[label] = max(best[label], _round(fn, raws, seconds / rounds))
    return best


FLOOR = """
import json, sys
texts = {}
with open(sys.argv[1], "rb") as f:
    for line in f:
        data = json.loads(line)
        parts = texts.setdefault(data.get("id"), [])
        for choice in data.get("choices") or ():
            parts.append((choice.get("delta") or {}).get("content") or "")
out = sys.stdout
for cid, parts in texts.items():
    out.write(json.dumps({"id": cid, "content": "".join(parts)}) + "\\n")
"""


def write_capture(path: Path, streams: int = 600, per_stream: int = 200, live: int = 50) -> int:
    """An interleaved JSON Lines capture: ``streams`` text streams of ``per_stream``
    chunks, ``live`` of them open at a time (as a gateway serving them at once)."""
    rng = random.Random(7)
    todo = [text_stream(f"chatcmpl-bench-{i:04d}", per_stream, rng) for i in range(streams)]
    todo.reverse()
    open_: list[list[dict[str, object]]] = []
    cursor: dict[int, int] = {}
    lines = []
    while todo or open_:
        while len(open_) < live and todo:
            stream = todo.pop()
            open_.append(stream)
            cursor[id(stream)] = 0
        stream = rng.choice(open_)
        lines.append(json.dumps(stream[cursor[id(stream)]], separators=(",", ":")))
        cursor[id(stream)] += 1
        if cursor[id(stream)] == len(stream):
            open_.remove(stream)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def _timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds user+sys, exit code) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stderr is not None:
        proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "chunkstitch"
    if script.exists():
        return [str(script)]
    found = shutil.which("chunkstitch")
    return [found] if found else [sys.executable, "-m", "processor"]


def whole_process(rounds: int) -> None:
    """The CLI subprocess vs the floor subprocess on the same file, interleaved."""
    with tempfile.TemporaryDirectory(prefix="cs-bench-") as tmp:
        capture = Path(tmp) / "capture.jsonl"
        floor_script = Path(tmp) / "floor.py"
        floor_script.write_text(FLOOR)
        n = write_capture(capture)
        size = capture.stat().st_size
        floor_cmd = [sys.executable, str(floor_script), str(capture)]
        cli_cmd = [*_cli(), "assemble", str(capture)]
        print(
            f"whole process: `{' '.join(cli_cmd[-2:])}` on {n:,} interleaved chunks "
            f"({size / 1e6:.1f} MB, 600 streams) vs a json.loads-and-join floor, "
            f"{rounds} alternating rounds"
        )
        for cmd in (floor_cmd, cli_cmd):  # warm the page cache and the .pyc files
            _timed(cmd)
        walls: list[float] = []
        cpus: list[float] = []
        print(
            f"{'round':>7}{'floor wall':>12}{'cli wall':>10}{'ratio':>7}"
            f"{'floor cpu':>11}{'cli cpu':>9}{'ratio':>7}"
        )
        for r in range(rounds):
            fw, fc, frc = _timed(floor_cmd)
            cw, cc, crc = _timed(cli_cmd)
            if frc or crc:
                raise SystemExit(f"a run failed: floor exit {frc}, chunkstitch exit {crc}")
            walls.append(fw / cw)
            cpus.append(fc / cc)
            print(
                f"{r + 1:>7}{fw:>11.2f}s{cw:>9.2f}s{fw / cw:>6.2f}x"
                f"{fc:>10.2f}s{cc:>8.2f}s{fc / cc:>6.2f}x"
            )
        for label, ratios in (("wall", walls), ("cpu", cpus)):
            median = statistics.median(ratios)
            verdict = "OK" if median >= 0.5 else "BELOW TARGET"
            print(
                f"chunkstitch assemble / floor ({label}): median {median:.2f}x, "
                f"spread {min(ratios):.2f}-{max(ratios):.2f}x (target >= 0.5x: {verdict})"
            )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks core", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument(
        "--process-rounds", type=int, default=7, help="rounds of the whole-process comparison"
    )
    parser.add_argument("--only-process", action="store_true", help="only the CLI comparison")
    args = parser.parse_args(argv)
    if args.only_process:
        whole_process(args.process_rounds)
        return
    rng = random.Random(42)
    cases = {
        "text, 500 chunks": [json.dumps(c).encode() for c in text_stream("bench-t", 500, rng)],
        "tool calls, 200 chunks": [
            json.dumps(c).encode() for c in tool_stream("bench-c", 200, rng)
        ],
    }
    header = ("stream", "floor c/s", "chunkstitch", "openai", "vs floor", "vs openai")
    print(
        f"{header[0]:<24}{header[1]:>12}{header[2]:>13}{header[3]:>11}{header[4]:>10}{header[5]:>11}"
    )
    for name, raws in cases.items():
        print(f"  measuring {name} ({args.seconds:.0f}s per implementation) ...", flush=True)
        results = measure(raws, args.seconds)
        print(
            f"{name:<24}{results['floor']:>12,.0f}{results['chunkstitch']:>13,.0f}"
            f"{results['openai']:>11,.0f}{results['chunkstitch'] / results['floor']:>9.2f}x"
            f"{results['chunkstitch'] / results['openai']:>10.1f}x"
        )
    whole_process(args.process_rounds)
