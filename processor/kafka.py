"""Small aiokafka helpers shared by the admin command, the worker and the clients."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from processor._seek import POLL_MS, Deadline, offsets_at
from processor.settings import Settings

__all__ = [
    "POLL_MS",
    "BrokerAuthFailed",
    "BrokerUnreachable",
    "ReadProgress",
    "connection_error",
    "describe_error",
    "end_offsets",
    "open_reader",
    "probe_broker",
    "read_to_end",
    "unreachable_message",
]

# The same words as the clients' BrokerUnavailable: one wording in every command.
START_HINT = (
    "start one with `chunkstitch broker` or point CHUNKSTITCH_BROKER at a running broker "
    "(host:port)"
)


class BrokerUnreachable(RuntimeError):
    """The broker did not answer; the message says which address and which setting."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail  # short cause: "connection refused", "unknown host 'x'", ...


class BrokerAuthFailed(BrokerUnreachable):
    """The broker answered but refused the credentials (SASL) or the TLS handshake."""


def _auth_errors() -> tuple[type[BaseException], ...]:
    from aiokafka import errors

    return (
        errors.AuthenticationFailedError,
        errors.AuthenticationMethodNotSupported,
        errors.SaslAuthenticationFailed,
        errors.UnsupportedSaslMechanismError,
        errors.IllegalSaslStateError,
    )


def describe_error(exc: BaseException) -> str:
    """``Type: message`` once (aiokafka's errors already start with their class name)."""
    text = str(exc).strip()
    name = type(exc).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


def unreachable_message(settings: Settings, exc: BaseException | str | None = None) -> str:
    if isinstance(exc, BaseException):
        exc = describe_error(exc)
    detail = f" ({exc})" if exc else ""
    return f"cannot reach the Kafka broker at {settings.broker}{detail}; {START_HINT}"


def _unreachable(settings: Settings, detail: str) -> BrokerUnreachable:
    return BrokerUnreachable(unreachable_message(settings, detail), detail)


def auth_failed_message(settings: Settings, detail: str) -> str:
    who = (
        f"SASL {settings.sasl_mechanism} as {settings.sasl_username!r}"
        if settings.sasl_mechanism
        else settings.security_protocol
    )
    return (
        f"the Kafka broker at {settings.broker} did not accept the connection's credentials "
        f"({who}: {detail}); check CHUNKSTITCH_SECURITY_PROTOCOL, CHUNKSTITCH_SASL_MECHANISM, "
        "CHUNKSTITCH_SASL_USERNAME and CHUNKSTITCH_SASL_PASSWORD (and CHUNKSTITCH_SSL_* for TLS)"
    )


def _auth_failed(settings: Settings, exc: BaseException) -> BrokerAuthFailed:
    if isinstance(exc, _auth_errors()):
        detail = describe_error(exc)
    elif isinstance(exc, ssl.SSLError):
        detail = f"TLS handshake failed: {describe_error(exc)}"
    else:  # e.g. the broker hangs up mid-exchange, or SCRAM ends without a signature
        detail = "the broker ended the authentication exchange without accepting it"
    return BrokerAuthFailed(auth_failed_message(settings, detail), detail)


async def probe_broker(
    settings: Settings, timeout_s: float | None = None
) -> BrokerUnreachable | None:
    """Connect to each bootstrap server in turn: TCP first, then a Kafka connection with
    the configured TLS/SASL.

    None as soon as one answers; otherwise the problem of the last one, as a
    :class:`BrokerUnreachable` whose one-line message says what was wrong (unknown host,
    connection refused, no answer) and what to do, or a :class:`BrokerAuthFailed` when
    the broker is there but the TLS/SASL handshake failed. The worker calls it before
    starting; the admin, readers and clients after a failed start.
    """
    from aiokafka.conn import create_conn

    timeout = min(timeout_s or settings.connect_timeout_s, settings.connect_timeout_s)
    kwargs = {k: v for k, v in settings.kafka_kwargs().items() if k != "bootstrap_servers"}
    secured = bool(settings.sasl_mechanism) or settings.security_protocol != "PLAINTEXT"
    problem: BrokerUnreachable | None = None
    servers = settings.bootstrap_servers
    for server in servers:
        at = f" ({server})" if len(servers) > 1 else ""
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
            writer.close()
        except socket.gaierror:
            problem = _unreachable(settings, f"unknown host {host!r}")
            continue
        except ConnectionRefusedError:
            problem = _unreachable(settings, f"connection refused{at}")
            continue
        except TimeoutError:
            problem = _unreachable(settings, f"no answer within {timeout:g} s{at}")
            continue
        except OSError as exc:
            problem = _unreachable(settings, describe_error(exc))
            continue
        try:  # the port answers: now speak Kafka, with the configured TLS and SASL
            conn = await asyncio.wait_for(
                create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **kwargs),
                timeout,
            )
        except TimeoutError:
            problem = _unreachable(
                settings,
                f"no answer within {timeout:g} s{at}; "
                "the port accepts connections but does not speak Kafka",
            )
        except Exception as exc:
            if secured or isinstance(exc, _auth_errors()):
                problem = _auth_failed(settings, exc)
            else:
                problem = _unreachable(settings, describe_error(exc))
        else:
            conn.close()
            return None
    return problem


async def connection_error(settings: Settings, exc: BaseException) -> BrokerUnreachable | None:
    """What to raise after a client failed to start with ``exc``, diagnosed in one line;
    None when the broker answers fine and ``exc`` is no Kafka or network error (the
    caller re-raises it: a bug, not a connection problem)."""
    if isinstance(exc, _auth_errors()):
        return _auth_failed(settings, exc)
    problem = await probe_broker(settings, timeout_s=3.0)
    if problem is not None:
        return problem
    if isinstance(exc, KafkaError | OSError):
        return _unreachable(settings, describe_error(exc))
    return None


async def open_reader(settings: Settings, **options: Any) -> AIOKafkaConsumer:
    """A started group-less consumer (no commits) for reading partitions it is assigned;
    a failed start is stopped (no "Unclosed AIOKafkaConsumer") and reported in one line."""
    consumer: AIOKafkaConsumer = AIOKafkaConsumer(
        **settings.kafka_kwargs(), enable_auto_commit=False, group_id=None, **options
    )
    try:
        await consumer.start()
    except Exception as exc:
        await asyncio.shield(consumer.stop())
        problem = await connection_error(settings, exc)
        if problem is None:
            raise
        raise problem from exc
    return consumer


async def end_offsets(
    settings: Settings, tps: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """ListOffsets(latest) of the partitions. On the embedded broker this can be the start
    of the last batch plus one (see :func:`read_to_end`): good as a place to start reading
    the newest records from, not as the end."""
    parts = list(tps)
    consumer = await open_reader(settings)
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(parts)
        return ends
    except KafkaError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    finally:
        await asyncio.shield(consumer.stop())


async def read_to_end(
    settings: Settings,
    tps: Iterable[TopicPartition],
    *,
    timeout_s: float = 30.0,
    start: Mapping[TopicPartition, int] | None = None,
    since_ms: Mapping[TopicPartition, int] | None = None,
    on_records: Callable[[list[ConsumerRecord[bytes, bytes]]], Awaitable[None] | None]
    | None = None,
    on_progress: Callable[[ReadProgress], None] | None = None,
    progress_every_s: float = 5.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the given partitions, from the beginning (or ``start``, or the first
    record written at or after ``since_ms``: :func:`processor._seek.offsets_at`) to the end.

    The end of each partition is its high watermark when the read reached it first, as
    the broker returns it in *fetch* responses: the embedded broker (Tansu) answers
    ListOffsets(latest) with the start of the last batch plus one, so ``end_offsets()``
    would stop early there. This is the one place that knows; on Apache Kafka both agree.
    Records produced after that are left to the caller's live consumer, so a busy topic
    cannot keep the read going forever.

    No fixed deadline that the data could outgrow: the read gives up (``TimeoutError``)
    only when it makes **no progress** (no record, no partition finished) for
    ``timeout_s``. A long read reports its progress every ``progress_every_s`` to
    ``on_progress`` (default: an info log line). With ``on_records`` the records are
    handed over batch by batch and not kept (the result is then empty): memory stays
    bounded by one fetch. An ``on_records`` that returns an awaitable is awaited before
    the next fetch (the usage recovery publishes its closed windows there).
    """
    parts = list(tps)
    if not parts:
        return []
    consumer = await open_reader(
        settings,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # reading to a known end: never wait for new records
    )
    out: list[ConsumerRecord[bytes, bytes]] = []
    progress = ReadProgress(partitions=len(parts))

    def stalled(what: str) -> TimeoutError:
        return TimeoutError(
            f"{what} made no progress for {timeout_s:.0f}s (after {progress.records} "
            f"records); is the broker at {settings.broker} overloaded or unreachable?"
        )

    deadline = Deadline(timeout_s, stalled)
    try:
        consumer.assign(parts)
        starts = dict(start or {})
        by_time = {tp: t for tp, t in (since_ms or {}).items() if tp not in starts}
        if by_time:
            starts.update(await offsets_at(consumer, by_time, deadline))
        from_beginning = [tp for tp in parts if tp not in starts]
        if from_beginning:
            await consumer.seek_to_beginning(*from_beginning)
        for tp, offset in starts.items():
            consumer.seek(tp, max(offset, 0))
        remaining = set(parts)
        targets: dict[TopicPartition, int] = {}
        began = last_report = time.monotonic()
        deadline.progress()
        while remaining:
            deadline.check(f"reading {sorted(str(tp) for tp in remaining)} to its end")
            batch: dict[Any, list[ConsumerRecord[bytes, bytes]]] = await consumer.getmany(
                *remaining, timeout_ms=POLL_MS
            )
            for tp, records in batch.items():
                target = targets.get(tp)
                if target is not None:
                    records = [r for r in records if r.offset < target]
                if not records:
                    continue
                progress.records += len(records)
                deadline.progress()
                if on_records is not None:
                    pending = on_records(records)
                    if pending is not None:
                        await pending
                else:
                    out.extend(records)
            for tp in list(remaining):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                target = targets.setdefault(tp, highwater)
                if await consumer.position(tp) >= target:
                    remaining.discard(tp)
                    progress.done += 1
                    deadline.progress()
            behind = 0
            for tp in remaining:
                if tp in targets:
                    behind += max(targets[tp] - await consumer.position(tp), 0)
            progress.behind = behind
            now = time.monotonic()
            if remaining and now - last_report >= progress_every_s:
                last_report = now
                progress.elapsed_s = now - began
                (on_progress or _log_progress)(progress)
    except KafkaError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    finally:
        await asyncio.shield(consumer.stop())
    return out


@dataclass
class ReadProgress:
    """How far a :func:`read_to_end` has come (passed to its ``on_progress``)."""

    partitions: int
    done: int = 0
    records: int = 0
    behind: int = 0
    """Records still to read to the targets known so far."""
    elapsed_s: float = 0.0


def _log_progress(progress: ReadProgress) -> None:
    from processor.logs import get_logger

    get_logger("chunkstitch.kafka").info(
        "long read in progress",
        partitions_done=f"{progress.done}/{progress.partitions}",
        records=progress.records,
        behind=progress.behind,
        elapsed_s=round(progress.elapsed_s, 1),
    )
