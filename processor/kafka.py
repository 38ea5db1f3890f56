"""Small aiokafka helpers shared by the admin command, the worker and the clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from processor.settings import Settings

__all__ = [
    "BrokerAuthFailed",
    "BrokerUnreachable",
    "connection_error",
    "describe_error",
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


def auth_failed_message(settings: Settings, exc: BaseException) -> str:
    who = (
        f"SASL {settings.sasl_mechanism} as {settings.sasl_username!r}"
        if settings.sasl_mechanism
        else settings.security_protocol
    )
    return (
        f"the Kafka broker at {settings.broker} refused to authenticate ({who}: "
        f"{describe_error(exc)}); check CHUNKSTITCH_SECURITY_PROTOCOL, "
        "CHUNKSTITCH_SASL_MECHANISM, CHUNKSTITCH_SASL_USERNAME and CHUNKSTITCH_SASL_PASSWORD"
    )


async def probe_broker(
    settings: Settings, timeout_s: float | None = None
) -> BrokerUnreachable | None:
    """Open one connection (with the configured TLS/SASL) to each bootstrap server in turn.

    None as soon as one answers; otherwise the error of the last one, as a
    :class:`BrokerUnreachable` (or :class:`BrokerAuthFailed`) whose one-line message says
    what was wrong (unknown host, connection refused, no answer, authentication) and what
    to do. The worker calls it before starting; the clients after a failed start.
    """
    import socket

    from aiokafka.conn import create_conn

    timeout = min(timeout_s or settings.connect_timeout_s, settings.connect_timeout_s)
    kwargs = {k: v for k, v in settings.kafka_kwargs().items() if k != "bootstrap_servers"}
    problem: BrokerUnreachable | None = None
    servers = settings.bootstrap_servers
    for server in servers:
        at = f" ({server})" if len(servers) > 1 else ""
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        try:
            conn = await asyncio.wait_for(
                create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **kwargs),
                timeout,
            )
        except _auth_errors() as exc:
            problem = BrokerAuthFailed(auth_failed_message(settings, exc), describe_error(exc))
        except socket.gaierror:
            problem = _unreachable(settings, f"unknown host {host!r}")
        except ConnectionRefusedError:
            problem = _unreachable(settings, f"connection refused{at}")
        except TimeoutError:
            problem = _unreachable(settings, f"no answer within {timeout:g} s{at}")
        except Exception as exc:  # any other failure: say what it was
            problem = _unreachable(settings, describe_error(exc))
        else:
            conn.close()
            return None
    return problem


async def connection_error(settings: Settings, exc: BaseException) -> BrokerUnreachable:
    """The error to raise after a client failed to start: diagnosed in one line."""
    if isinstance(exc, _auth_errors()):
        return BrokerAuthFailed(auth_failed_message(settings, exc), describe_error(exc))
    problem = await probe_broker(settings, timeout_s=3.0)
    return problem or _unreachable(settings, describe_error(exc))


async def read_to_end(
    settings: Settings,
    tps: Iterable[TopicPartition],
    *,
    timeout_s: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of the given partitions, from the beginning to the current end.

    The end is the high watermark that the broker returns in *fetch* responses: the
    embedded broker (Tansu) answers ListOffsets(latest) with the start of the last batch
    plus one, so ``end_offsets()`` would stop early there. This is the one place that
    knows; on Apache Kafka both agree.
    """
    parts = list(tps)
    if not parts:
        return []
    consumer: AIOKafkaConsumer = AIOKafkaConsumer(
        **settings.kafka_kwargs(),
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,  # reading to a known end: never wait for new records
    )
    try:
        await consumer.start()
    except (KafkaError, OSError) as exc:
        await asyncio.shield(consumer.stop())  # else "Unclosed AIOKafkaConsumer" at exit
        raise await connection_error(settings, exc) from exc
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        remaining = set(parts)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"reading {sorted(str(tp) for tp in remaining)} to its end took longer "
                    f"than {timeout_s:.0f}s; is the broker at {settings.broker} overloaded?"
                )
            batch: dict[Any, list[ConsumerRecord[bytes, bytes]]] = await consumer.getmany(
                *remaining, timeout_ms=200
            )
            for records in batch.values():
                out.extend(records)
            for tp in list(remaining):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    remaining.discard(tp)
    except KafkaError as exc:
        raise BrokerUnreachable(unreachable_message(settings, exc)) from exc
    finally:
        await asyncio.shield(consumer.stop())
    return out
