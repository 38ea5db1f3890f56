"""`chunkstitch topics create | list` on the real embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from processor.broker import free_port
from topics import topic_specs

N_TOPICS = len(topic_specs())


def _run(broker: str, *args: str, tag: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CHUNKSTITCH_BROKER": broker,
        "COLUMNS": "200",
        **{
            f"CHUNKSTITCH_TOPIC_{r.upper()}": f"{tag}.{r}"
            for r in ("chunks", "responses", "rollups", "deadletter", "ledger")
        },
        "CHUNKSTITCH_PARTITIONS": "3",
    }
    return subprocess.run(
        [sys.executable, "-m", "processor", "topics", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_create_is_idempotent_and_list_shows_configs(broker: str) -> None:
    tag = f"t{uuid.uuid4().hex[:6]}"
    listed = _run(broker, "list", tag=tag)
    assert listed.returncode == 0
    assert "run `chunkstitch topics create`" in listed.stderr
    first = _run(broker, "create", tag=tag)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == N_TOPICS
    again = _run(broker, "create", tag=tag)
    assert again.returncode == 0
    assert again.stdout.count("exists") == N_TOPICS
    listed = _run(broker, "list", tag=tag)
    assert f"{tag}.responses" in listed.stdout
    assert "cleanup.policy=compact" in listed.stdout
    assert "MISSING" not in listed.stdout


def test_unreachable_broker_says_what_to_do() -> None:
    proc = _run(f"127.0.0.1:{free_port()}", "create", tag="x")
    assert proc.returncode == 2  # the same exit code as publish, consume and usage
    assert "cannot reach the Kafka broker" in proc.stderr
    assert "CHUNKSTITCH_BROKER" in proc.stderr
