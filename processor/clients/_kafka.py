"""Shared aiokafka plumbing: connection options from Settings, fail-fast start, topic check."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from processor.clients._errors import BrokerUnavailable, ClientError, UnknownTopic
from processor.settings import Settings

__all__ = ["connection_options", "ensure_topic", "start_client"]


def connection_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments shared by producers and consumers (bootstrap, SASL, TLS)."""
    return dict(settings.kafka_kwargs())


async def start_client(client: Any, settings: Settings) -> None:
    """``await client.start()`` within ``connect_timeout_s``; a clear error otherwise."""
    timeout = settings.connect_timeout_s
    try:
        await asyncio.wait_for(client.start(), timeout)
    except TimeoutError:
        await _quiet_stop(client)
        raise BrokerUnavailable(settings.broker, f"no answer within {timeout:g} s") from None
    except Exception as exc:
        await _quiet_stop(client)
        from processor.kafka import BrokerAuthFailed, connection_error

        diagnosed = await connection_error(settings, exc)  # auth failure is not "unreachable"
        if diagnosed is None:
            raise
        if isinstance(diagnosed, BrokerAuthFailed):
            raise ClientError(str(diagnosed)) from exc
        raise BrokerUnavailable(settings.broker, diagnosed.detail) from exc


async def ensure_topic(topic_names: set[str], topic: str, settings: Settings) -> None:
    """Raise :class:`UnknownTopic` when ``topic`` is not in the broker's metadata."""
    if topic not in topic_names:
        raise UnknownTopic(topic, settings.broker)


async def _quiet_stop(client: Any) -> None:
    # cleanup after a failed start; the start error is what the caller sees
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.stop(), 2.0)
