"""Real worker processes for integration tests, and helpers to feed and read topics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from processor.admin import create_topics
from processor.broker import free_port
from processor.settings import Settings
from topics import RecordMeta, encode_headers


def isolated_settings(broker: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with unique topic names and app id, so tests never share state."""
    tag = uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "broker": broker,
        "app_id": f"cs-test-{tag}",
        "topic_chunks": f"t{tag}.chunks",
        "topic_responses": f"t{tag}.responses",
        "topic_rollups": f"t{tag}.rollups",
        "topic_deadletter": f"t{tag}.deadletter",
        "topic_ledger": f"t{tag}.ledger",
        "partitions": 4,
        "session_timeout_s": 3.0,
        "heartbeat_interval_s": 0.5,
        "commit_interval_s": 0.5,
        "idle_timeout_s": 4.0,
        "usage_grace_s": 0.5,
        "data_dir": str(tmp_path / "data"),
        "log_format": "json",
    }
    base.update(overrides)
    return Settings(**base)


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), **extra}


@dataclass
class WorkerProcess:
    """``python -m processor worker`` as a real subprocess."""

    settings: Settings
    log_path: Path
    web_port: int = field(default_factory=free_port)
    usage_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 45.0) -> WorkerProcess:
        env = env_for(
            self.settings,
            CHUNKSTITCH_WEB_PORT=str(self.web_port),
            CHUNKSTITCH_USAGE_PORT=str(self.usage_port),
        )
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "processor", "worker"], env=env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.proc.returncode}; see {self.log_path}"
                )
            if self.ready() and (not self.settings.usage_enabled or self._usage_listening()):
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready within {ready_timeout_s}s; see {self.log_path}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/readyz", timeout=1) as r:
                return bool(json.loads(r.read())["ready"])
        except Exception:
            return False

    def _usage_listening(self) -> bool:
        """The /usage server (a child process of the worker) accepts connections."""
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.usage_port), timeout=1).close()
            return True
        except OSError:
            return False

    def get(self, path: str) -> bytes:
        """GET ``path`` from the worker's web port, ``/usage`` from its usage port."""
        port = self.usage_port if path.startswith("/usage") else self.web_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            data: bytes = r.read()
            return data

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


async def make_topics(settings: Settings) -> None:
    states = await create_topics(settings)
    assert all(s.exists for s in states), states


Outgoing = tuple[bytes | None, bytes, RecordMeta]


async def produce(
    settings: Settings,
    records: Iterable[Outgoing],
    topic: str | None = None,
    partition: int | None = None,
) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all", linger_ms=5)
    await producer.start()
    n = 0
    try:
        futures = []
        for key, value, meta in records:
            futures.append(
                await producer.send(
                    topic or settings.topic_chunks,
                    value,
                    key=key,
                    partition=partition,
                    headers=encode_headers(meta),
                )
            )
            n += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n


async def read_topic(
    settings: Settings,
    topic: str,
    *,
    until: int,
    timeout_s: float = 60.0,
    distinct_keys: bool = True,
) -> list[tuple[bytes | None, bytes]]:
    """Records of ``topic`` from the beginning until ``until`` distinct keys (or records)
    have been read, or ``timeout_s`` passed (bounded)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.broker, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[tuple[bytes | None, bytes]] = []
    keys: set[bytes | None] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                for rec in records:
                    out.append((rec.key, rec.value))
                    keys.add(rec.key)
            if (len(keys) if distinct_keys else len(out)) >= until:
                break
    finally:
        await consumer.stop()
    return out


async def read_quiet(
    settings: Settings, topic: str, *, quiet_s: float = 2.0, timeout_s: float = 60.0
) -> list[tuple[bytes | None, bytes]]:
    """Every record of ``topic`` from the beginning, until none arrived for ``quiet_s``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.broker, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last_new < quiet_s:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    out.append((rec.key, rec.value))
                    last_new = time.monotonic()
    finally:
        await consumer.stop()
    return out
