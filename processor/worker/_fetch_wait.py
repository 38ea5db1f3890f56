"""faust-streaming hard-codes ``fetch_max_wait_ms=1500`` for the worker's aiokafka consumer.

A broker that answers a fetch only when that wait expires (the embedded broker, Tansu,
does not wake a waiting fetch when records arrive) then adds up to 1.5 s of latency to
every completion. Kafka wakes waiting fetches, so a shorter wait costs it only a few more
idle fetch requests per second. This is the one place that overrides the value: it wraps
faust's consumer factory and sets the wait from ``CHUNKSTITCH_FETCH_MAX_WAIT_MS``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install_fetch_wait"]

_installed: dict[str, int] = {}


def install_fetch_wait(wait_ms: int) -> None:
    """Make every faust worker consumer created from now on use ``wait_ms``."""
    from faust.transport.drivers import aiokafka as driver

    thread: Any = driver.AIOKafkaConsumerThread
    _installed["wait_ms"] = wait_ms
    if getattr(thread, "_chunkstitch_wrapped", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = _installed["wait_ms"]
        return consumer

    thread._create_worker_consumer = create
    thread._chunkstitch_wrapped = True
