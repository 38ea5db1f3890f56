"""Fault injection on the real embedded broker while traffic flows (issue 12, points 1 and 4).

* A worker SIGSTOPped for longer than the idle timeout and then resumed, in a group of
  three, must not emit a wrong or conflicting result for a partition that moved away
  meanwhile, nor dead-letter good chunks when it gets the partition back.
* Two workers whose broker connections are cut three times and then blackholed (a TCP
  proxy between them and the broker, ``tests/helpers/tcpproxy.py``) must deliver every
  completion, or exit non-zero with a critical log line, after which their restart
  delivers it. Repeated in several rounds: the hang this catches is intermittent.

Results are judged per completion id on the responses topic, in offset order: never an
``incomplete``/``error`` record after a ``complete`` one, and the latest record equals the
core's own assembly of the published chunks; no ``late_chunk`` dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from processor.settings import Settings
from processor.synthetic import SyntheticStream
from tests.helpers.tcpproxy import ProxiedBroker
from tests.helpers.worker import (
    Outgoing,
    WorkerProcess,
    isolated_settings,
    make_topics,
    read_quiet,
    read_topic,
)
from tests.integration._streams import build_streams, comparable, expected, wire
from topics import encode_headers

IDLE_S = 5.0
SESSION_S = 3.0
STALL_S = 20.0
"""CHUNKSTITCH_STALL_TIMEOUT_S of the network-fault workers: a worker waiting longer on the
broker exits (loudly) and is restarted within RECOVERY_S."""
RECOVERY_S = 60.0
"""Bound on recovery after the last fault: a worker must deliver, or exit and be restarted,
within it. Below the 90 s that an unanswered request waits with faust's default
broker_request_timeout, which is where the worker without bounded waits sat."""


# -- helpers ------------------------------------------------------------------------------
async def _pace(settings: Settings, records: Sequence[Outgoing], seconds: float) -> None:
    """Publish ``records`` in order, spread evenly over ``seconds`` (bounded)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all", linger_ms=5)
    await producer.start()
    try:
        slices = max(int(seconds / 0.25), 1)
        step = -(-len(records) // slices)
        start = time.monotonic()
        pending = []
        for i in range(0, len(records), step):
            for key, value, meta in records[i : i + step]:
                pending.append(
                    await producer.send(
                        settings.topic_chunks, value, key=key, headers=encode_headers(meta)
                    )
                )
            due = start + (i // step + 1) * seconds / slices
            await asyncio.sleep(max(due - time.monotonic(), 0))
        await asyncio.wait_for(asyncio.gather(*pending), 60)
    finally:
        await producer.stop()


async def _start_all(workers: Sequence[WorkerProcess]) -> None:
    await asyncio.gather(*(asyncio.to_thread(w.start, 60.0) for w in workers))


async def _settled(workers: Sequence[WorkerProcess], partitions: int, timeout_s: float) -> None:
    """Wait until the group's assignment covers every partition exactly once."""
    deadline = time.monotonic() + timeout_s
    seen: list[list[int]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            seen = [json.loads(w.get("/readyz"))["partitions"] for w in workers]
            flat = sorted(p for parts in seen for p in parts)
            if all(seen) and flat == list(range(partitions)):
                return
        await asyncio.sleep(0.3)
    raise AssertionError(f"the group did not settle within {timeout_s}s: {seen}")


def _waves(streams: list[SyntheticStream], seed: int, size: int) -> list[Outgoing]:
    """Records of ``size`` streams at a time, interleaved within each wave: paced over the
    run, no stream waits longer between two of its chunks than one wave lasts (which must
    stay under the idle timeout, or the worker rightly closes it as incomplete)."""
    out: list[Outgoing] = []
    for n, i in enumerate(range(0, len(streams), size)):
        out += wire(streams[i : i + size], seed=seed + n, dup_rate=0.05, swap_rate=0.05)
    return out


def _judge(
    responses: list[tuple[bytes | None, bytes]],
    dead: list[tuple[bytes | None, bytes]],
    streams: list[SyntheticStream],
) -> str:
    """Assert the results; returns a one-line summary for the test log."""
    history: dict[str, list[dict[str, Any]]] = {}
    for key, value in responses:
        assert key is not None
        history.setdefault(key.decode(), []).append(json.loads(value))
    problems = []
    late = [json.loads(v) for _, v in dead if json.loads(v)["reason"] == "late_chunk"]
    if late:
        problems.append(
            f"{len(late)} good chunks dead-lettered as late_chunk, e.g. completion "
            f"{late[0].get('completion_id')!r} offset {late[0]['source_offset']}"
        )
    missing = [s.completion_id for s in streams if s.completion_id not in history]
    if missing:
        problems.append(f"{len(missing)} completions never arrived, e.g. {missing[:3]}")
    regressed = []
    for cid, records in history.items():
        statuses = [r["chunkstitch"]["status"] for r in records]
        if "complete" in statuses and any(
            s != "complete" for s in statuses[statuses.index("complete") :]
        ):
            regressed.append((cid, statuses))
    if regressed:
        problems.append(
            f"{len(regressed)} completions got an incomplete/error record after a complete "
            f"one (a stale worker overwrote the result), e.g. {regressed[:3]}"
        )
    wrong = [
        s.completion_id
        for s in streams
        if s.completion_id in history and comparable(history[s.completion_id][-1]) != expected(s)
    ]
    if wrong:
        problems.append(f"{len(wrong)} completions' latest record is wrong, e.g. {wrong[:3]}")
    assert not problems, "; ".join(problems)
    extra = sum(len(r) - 1 for r in history.values())
    return f"{len(history)} completions, {extra} repeated records, {len(dead)} dead letters"


def _critical_lines(log: Path) -> list[str]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("level") == "critical":
                out.append(line)
    return out


def _last_line_age_s(log: Path) -> float:
    return time.time() - log.stat().st_mtime


# -- a. SIGSTOP past the idle timeout -----------------------------------------------------------
async def test_worker_paused_past_idle_timeout_never_overwrites_a_result(
    broker: str, tmp_path: Path
) -> None:
    settings = isolated_settings(
        broker, tmp_path, partitions=6, idle_timeout_s=IDLE_S, session_timeout_s=SESSION_S
    )
    await make_topics(settings)
    streams = build_streams(200, seed=51, prefix="pause")
    records = _waves(streams, seed=52, size=25)  # 8 waves of ~2.5 s
    workers = [WorkerProcess(settings, tmp_path / f"worker-{i}.log") for i in range(3)]
    try:
        await _start_all(workers)
        await _settled(workers, settings.partitions, timeout_s=40)
        traffic = asyncio.ensure_future(_pace(settings, records, seconds=20))
        await asyncio.sleep(5)
        # the victim: a worker holding open completions (mid-wave) right now
        open_now = [0]
        for _ in range(30):
            open_now = [json.loads(w.get("/readyz"))["in_flight"] for w in workers]
            if max(open_now) >= 5:
                break
            await asyncio.sleep(0.1)
        assert max(open_now) > 0, f"no worker holds an open completion: {open_now}"
        victim = workers[open_now.index(max(open_now))]
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            # past the session timeout (its partitions move) and the idle timeout (its
            # open completions look idle by its own clock when it wakes up)
            await asyncio.sleep(IDLE_S + SESSION_S + 3)
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        await traffic
        await read_topic(settings, settings.topic_responses, until=len(streams), timeout_s=60)
        # let every timer fire, and the resumed worker rejoin and replay, before judging
        await asyncio.sleep(IDLE_S + SESSION_S + 2)
        responses = await read_quiet(settings, settings.topic_responses)
        dead = await read_quiet(settings, settings.topic_deadletter, quiet_s=1.0)
        for w in workers:  # the two others carry on; an exit is allowed only loudly
            assert w.proc is not None
            code = w.proc.poll()
            if code is not None:
                assert code != 0, f"a worker exited with 0 mid-run: {w.log_path}"
                assert _critical_lines(w.log_path), (
                    f"a worker exited with {code} without a critical log line: {w.log_path}"
                )
    finally:
        for w in workers:
            w.stop()
    print(f"paused worker {open_now} open: " + _judge(responses, dead, streams))


# -- b. connections cut and blackholed ------------------------------------------------------------
@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedBroker]:
    log = tmp_path_factory.mktemp("proxied-broker") / "tansu.log"
    with ProxiedBroker(log_path=log) as running:
        yield running


def _pids(workers: Sequence[WorkerProcess]) -> list[int]:
    return [w.proc.pid for w in workers if w.proc is not None and w.proc.poll() is None]


# Two rounds (other seeds, other cut lengths) in the suite: each takes ~75 s of scripted
# faults and recovery; CHUNKSTITCH_TEST_FAULT_ROUNDS=N runs more before a release.
@pytest.mark.parametrize(
    "round_no", range(int(os.environ.get("CHUNKSTITCH_TEST_FAULT_ROUNDS", "2")))
)
async def test_workers_cut_off_and_blackholed_deliver_everything_or_exit_loudly(
    proxied: ProxiedBroker, tmp_path: Path, round_no: int
) -> None:
    settings = isolated_settings(
        proxied.bootstrap,
        tmp_path,
        partitions=4,
        idle_timeout_s=IDLE_S,
        session_timeout_s=SESSION_S,
        stall_timeout_s=STALL_S,
    )
    await make_topics(settings)
    rng = random.Random(600 + round_no)
    cuts = [rng.uniform(3, 7) for _ in range(3)]
    streams = build_streams(160, seed=61 + round_no, prefix=f"net{round_no}")
    records = _waves(streams, seed=71 + round_no, size=20)  # 8 waves of ~4 s
    workers = [WorkerProcess(settings, tmp_path / f"worker-{i}.log") for i in range(2)]
    restarts: list[str] = []
    try:
        await _start_all(workers)
        await _settled(workers, settings.partitions, timeout_s=40)
        proxied.proxy.target(*_pids(workers))
        fault_s = sum(cuts) + 1.5 * len(cuts) + 10
        traffic = asyncio.ensure_future(_pace(settings, records, seconds=fault_s + 4))
        await asyncio.sleep(2)
        for seconds in cuts:
            proxied.proxy.refuse(seconds)  # cut every connection, refuse new ones
            await asyncio.sleep(seconds)
            proxied.proxy.resume()
            await asyncio.sleep(1.5)
        proxied.proxy.blackhole(10)
        await asyncio.sleep(10)
        proxied.proxy.resume()
        await traffic
        # Recovery, bounded: every completion arrives, or a worker exits non-zero with a
        # critical log line and is restarted (once per worker slot and round).
        deadline = time.monotonic() + RECOVERY_S
        arrived: set[bytes | None] = set()
        while time.monotonic() < deadline:
            got = await read_topic(
                settings, settings.topic_responses, until=len(streams), timeout_s=3
            )
            arrived = {k for k, _ in got}
            if len(arrived) >= len(streams):
                break
            for i, w in enumerate(workers):
                assert w.proc is not None
                code = w.proc.poll()
                if code is None:
                    continue
                assert code != 0, f"worker {i} exited with 0 while work was left: {w.log_path}"
                critical = _critical_lines(w.log_path)
                assert critical, (
                    f"worker {i} exited with {code} without a critical log line saying "
                    f"what it waited for: {w.log_path}"
                )
                restarts.append(f"worker {i} exited {code}: {critical[-1][:300]}")
                workers[i] = WorkerProcess(settings, tmp_path / f"worker-{i}-restart.log")
                await asyncio.to_thread(workers[i].start, 60.0)
        else:
            state = [
                f"worker {i}: "
                + ("alive" if w.proc and w.proc.poll() is None else "exited")
                + f", last log line {_last_line_age_s(w.log_path):.0f}s ago ({w.log_path})"
                for i, w in enumerate(workers)
            ]
            raise AssertionError(
                f"hang: {len(streams) - len(arrived)} of {len(streams)} completions never "
                f"arrived within {RECOVERY_S:.0f} s after the faults (cuts "
                f"{[round(c, 1) for c in cuts]} s, blackhole 10 s) and no worker exited; "
                + "; ".join(state)
            )
        await asyncio.sleep(IDLE_S + 1)
        responses = await read_quiet(settings, settings.topic_responses)
        dead = await read_quiet(settings, settings.topic_deadletter, quiet_s=1.0)
    finally:
        proxied.proxy.resume()
        proxied.proxy.target()
        for w in workers:
            w.stop()
    summary = _judge(responses, dead, streams)
    print(f"round {round_no}: cuts {[round(c, 1) for c in cuts]} s: {summary}; {restarts}")


# -- static membership: a clean stop leaves the group at once -------------------------------------
async def test_static_worker_leaves_the_group_when_it_stops_cleanly(
    broker: str, tmp_path: Path
) -> None:
    """With an instance id, aiokafka alone sends no LeaveGroup on close; the worker's
    override does (processor/worker/_faust.py) and the broker accepts it. Only one
    static member here: the embedded broker never settles a group of two (see
    tests/unit/test_faust_static.py), which is why the setting is off by default."""
    settings = isolated_settings(broker, tmp_path, group_instance_id="cs-test-{hostname}")
    await make_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "static.log").start(ready_timeout_s=60)
    worker.stop()  # SIGTERM: a clean stop
    assert worker.proc is not None
    assert worker.proc.returncode == 0
    left = [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if "left the consumer group on shutdown" in line
    ]
    assert left, f"no LeaveGroup on a clean stop: {worker.log_path}"
    assert left[-1]["error_code"] == 0, left[-1]
    assert left[-1]["member_id"].startswith(f"cs-test-{socket.gethostname()}"), left[-1]
