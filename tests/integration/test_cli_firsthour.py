"""The CLI on the real embedded broker, as a newcomer meets it in the first hour.

* ``consume``, ``usage`` and ``topics list`` at 80 columns: piped (rich's default width),
  with ``COLUMNS=80``, and on a real pseudo-terminal of 80 columns: no id, status or number
  cut, no line longer than 80, no ``*`` columns, UTC window times, honest latency.
* A worker logs ``worker ready`` (partitions, web address) and ``worker stopped``, with no
  cursor codes in its log; publishing the example capture twice gives twice the
  completions and no ``late_chunk`` dead letters.
* A broker that refuses the SASL credentials is reported as such, not as unreachable.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from processor.broker import broker_binary, free_port
from processor.core import assemble_many, combine, contribution, parse_chunk, result, zero
from processor.kafka import read_to_end
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks
from tests.helpers.worker import WorkerProcess, env_for, isolated_settings, make_topics
from topics import ChatCompletion

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "chunkstitch")
LONG_ID = "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _response(cid: str, tenant: str, *, finished: bool = True) -> ChatCompletion:
    words = ["a", "fairly", "long", "answer", "that", "has", "to", "be", "cut", "somewhere"]
    chunks = fake_chunks(cid, words * 3)
    if not finished:
        chunks = chunks[:-2]
    (response,) = assemble_many(parse_chunk(c) for c in chunks)
    meta = response.chunkstitch
    meta.tenant, meta.provider = tenant, "openai"
    now = int(time.time() * 1000)
    meta.request_started_at_ms, meta.first_chunk_at_ms = now, now + 6
    meta.time_to_first_chunk_ms, meta.duration_ms = 6, 40
    return response


async def _fill(settings: Settings) -> list[ChatCompletion]:
    await make_topics(settings)
    responses = [_response(LONG_ID, "acme"), _response("r2", "other", finished=False)]
    hourly = settings.rollups_hourly_topic
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
    await producer.start()
    try:
        for r in responses:
            await producer.send_and_wait(settings.topic_responses, r.to_json(), key=r.id.encode())
            # what a worker publishes: 1-minute rollups and 1-hour rollups (own topic)
            for size, topic in ((60_000, settings.topic_rollups), (3_600_000, hourly)):
                key, totals = contribution(r, window_ms=size)
                rollup = result(key, combine(zero(), totals), 0)
                await producer.send_and_wait(
                    topic,
                    rollup.model_dump_json().encode(),
                    key=key.record_key(0).encode(),
                    partition=0,
                )
    finally:
        await producer.stop()
    return responses


def _piped(args: list[str], settings: Settings, **env: str) -> str:
    base = {k: v for k, v in env_for(settings).items() if k != "COLUMNS"}
    proc = subprocess.run(
        [CLI, *args], env={**base, **env}, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _on_terminal(args: list[str], settings: Settings, columns: int = 80) -> str:
    """stdout on a real pseudo-terminal of ``columns`` columns (no COLUMNS variable)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in env_for(settings).items() if k not in ("COLUMNS", "LINES")}
    try:
        proc = subprocess.Popen(
            [CLI, *args], env=env, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
    return ANSI.sub("", seen.decode()).replace("\r\n", "\n")


def _fits(text: str, width: int = 80) -> None:
    too_long = [line for line in text.splitlines() if len(line.rstrip()) > width]
    assert not too_long, text


async def test_consume_usage_and_topics_read_at_80_columns_and_piped(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path)
    await _fill(settings)
    consume = ["consume", "--from-beginning", "--timeout", "2"]
    outputs = {
        "piped": await asyncio.to_thread(_piped, consume, settings),
        "COLUMNS=80": await asyncio.to_thread(_piped, consume, settings, COLUMNS="80"),
        "terminal": await asyncio.to_thread(_on_terminal, consume, settings),
    }
    for how, text in outputs.items():
        _fits(text)
        assert LONG_ID in text, how  # the whole id, never "chatcm..."
        assert re.search(r"\bcomplete\b", text), how
        assert re.search(r"\bincomplete\b", text), how
        assert "2 response(s)" in text

    usage = ["usage", "--by", "tenant", "--window", "1h", "--since", "1d"]
    for text in (
        await asyncio.to_thread(_piped, usage, settings),
        await asyncio.to_thread(_on_terminal, usage, settings),
    ):
        _fits(text)
        assert "*" not in text  # no columns of dimensions that were not asked for
        assert re.search(r"\b\d{4}-\d\d-\d\dT\d\d:\d\dZ\b", text)  # ISO-8601, UTC
        assert "<= 10 ms" in text  # a 6 ms time to first chunk, shown as its bucket
        assert " 10 ms" not in text.replace("<= 10 ms", "")
        for tenant in ("acme", "other"):
            assert tenant in text
    wide = await asyncio.to_thread(
        _piped, [*usage[:2], "tenant,model,provider,status", *usage[3:]], settings
    )
    _fits(wide)  # too wide for a table: one block per row, nothing cut
    assert "incomplete" in wide
    assert "provider openai" in wide

    topics = await asyncio.to_thread(_piped, ["topics", "list"], settings)
    _fits(topics)
    for name in (settings.topic_chunks, settings.topic_responses, settings.topic_ledger):
        assert name in topics
    assert "cleanup.policy=compact" in topics
    listed = await asyncio.to_thread(_piped, ["topics", "list", "--json"], settings)
    rows = [json.loads(line) for line in listed.splitlines()]
    assert {r["topic"] for r in rows} >= {settings.topic_chunks, settings.topic_responses}
    assert all(r["exists"] for r in rows)


async def test_worker_says_ready_and_stopped_and_a_capture_publishes_twice(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, tmp_path)
    await make_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    await asyncio.to_thread(worker.start)
    try:
        env = env_for(settings)
        sent = []
        for _ in range(2):
            proc = await asyncio.to_thread(
                subprocess.run,
                [CLI, "publish", str(ROOT / "examples" / "capture.sse"), "--tenant", "twice"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
            assert "--keep-ids" in proc.stdout
            sent.append(re.search(r"completion ids end in '(-r[0-9a-f]+)'", proc.stdout))
        suffixes = {m[1] for m in sent if m}
        assert len(suffixes) == 2
        consumed = await asyncio.to_thread(
            subprocess.run,
            [CLI, "consume", "--from-beginning", "--json", "--limit", "10", "--timeout", "30"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert consumed.returncode == 0, consumed.stderr
        got = [ChatCompletion.model_validate_json(line) for line in consumed.stdout.splitlines()]
        assert len({r.id for r in got}) == 10
        assert {r.id[-8:] for r in got} == suffixes
        assert all(r.chunkstitch.status == "complete" for r in got)
        dlq = [TopicPartition(settings.topic_deadletter, p) for p in range(settings.partitions)]
        letters = [json.loads(r.value) for r in await read_to_end(settings, dlq)]
        assert [x["reason"] for x in letters] == []  # no late_chunk from the second run
    finally:
        await asyncio.to_thread(worker.stop)
    assert worker.proc is not None
    assert worker.proc.returncode == 0
    log = (tmp_path / "worker.log").read_text()
    assert "\x1b" not in log  # no cursor codes from faust's spinner
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    ready = [x for x in lines if x["event"] == "worker ready"]
    assert len(ready) == 1
    assert ready[0]["partitions"] == list(range(settings.partitions))
    assert ready[0]["web"] == f"http://127.0.0.1:{worker.web_port}"
    stopped = [x for x in lines if x["event"] == "worker stopped"]
    assert len(stopped) == 1
    assert stopped[0]["exit_code"] == 0

    # faust draws its start-up spinner only at WARNING and above (the demo's level).
    quiet = WorkerProcess(
        settings.model_copy(update={"log_level": "WARNING"}), tmp_path / "quiet.log"
    )
    await asyncio.to_thread(quiet.start)
    await asyncio.to_thread(quiet.stop)
    assert "\x1b" not in (tmp_path / "quiet.log").read_text()


def test_refused_sasl_credentials_are_not_called_unreachable(tmp_path: Path) -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = (tmp_path / "tansu.log").open("wb")
    tansu = subprocess.Popen(
        [
            *(broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url),
            *("--storage-engine", "memory://tansu/", "--authentication"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKSTITCH_")}
        env |= {
            "CHUNKSTITCH_BROKER": f"127.0.0.1:{port}",
            "CHUNKSTITCH_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "CHUNKSTITCH_SASL_MECHANISM": "PLAIN",
            "CHUNKSTITCH_SASL_USERNAME": "bob",
            "CHUNKSTITCH_SASL_PASSWORD": "wrong",
            "CHUNKSTITCH_CONNECT_TIMEOUT_S": "5",
        }
        for args in (["topics", "list"], ["publish", str(ROOT / "examples" / "capture.sse")]):
            proc = subprocess.run(
                [CLI, *args], env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1, proc.stderr
            assert "did not accept the connection's credentials (SASL PLAIN as 'bob'" in lines[0]
            assert "CHUNKSTITCH_SASL_PASSWORD" in lines[0]
            assert "cannot reach" not in lines[0]
            assert "wrong" not in lines[0]  # never the password
    finally:
        tansu.terminate()
        tansu.wait(timeout=10)
        log.close()
