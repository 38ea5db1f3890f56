"""Errors of the client libraries; every message says what was wrong and what to do."""

from __future__ import annotations

__all__ = [
    "BrokerUnavailable",
    "ClientError",
    "DeliveryError",
    "InvalidRecord",
    "PublishError",
    "UnknownTopic",
    "WaitTimeout",
]


class ClientError(Exception):
    """Base class of every chunkstitch client error."""


class BrokerUnavailable(ClientError):
    """The broker could not be reached within the connect timeout."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(
            f"cannot reach the Kafka broker at {address} ({detail}); start one with "
            f"`chunkstitch broker` or point CHUNKSTITCH_BROKER at a running broker (host:port)"
        )
        self.address = address


class UnknownTopic(ClientError):
    """The topic does not exist on the broker."""

    def __init__(self, topic: str, address: str) -> None:
        super().__init__(
            f"topic {topic!r} does not exist on the broker at {address}; "
            f"run `chunkstitch topics create` first"
        )
        self.topic = topic


class PublishError(ClientError):
    """A chunk could not be published (raised when no error callback is set)."""


class DeliveryError(PublishError):
    """One record was not delivered; given to the publisher's error callback."""

    def __init__(
        self, message: str, *, key: bytes | None, seq: int | None, cause: BaseException | None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.seq = seq
        self.cause = cause


class InvalidRecord(ClientError):
    """A finished-response record did not validate (raised only when asked to)."""

    def __init__(self, message: str, *, partition: int, offset: int) -> None:
        super().__init__(message)
        self.partition = partition
        self.offset = offset


class WaitTimeout(ClientError, TimeoutError):
    """No finished response for the awaited completion id arrived in time."""
