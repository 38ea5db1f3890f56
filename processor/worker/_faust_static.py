"""Static group membership for the worker's consumer (Kafka's ``group.instance.id``, KIP-345).

With an instance id, a worker that restarts within the session timeout (crash, OOM kill,
container restart: the pod keeps its name) rejoins the group as the same member: the
coordinator hands it its old partitions and the other workers never rebalance. Without
one, every restart costs two eager rebalances (the new member joins; the dead one's
session expires), each stalling every partition of the group.

What this module overrides, and why (faust-streaming 0.15.3, aiokafka 0.14):

1. The instance id itself needs no override: faust's public setting
   ``consumer_group_instance_id`` is passed to ``aiokafka.AIOKafkaConsumer(
   group_instance_id=...)`` by ``AIOKafkaConsumerThread._create_worker_consumer``.
   :func:`install_static_membership` sets it from ``CHUNKSTITCH_GROUP_INSTANCE_ID``
   (``{hostname}`` in the value is replaced by the host name).
2. aiokafka's ``GroupCoordinator._maybe_leave_group`` sends no LeaveGroup at all when a
   ``group_instance_id`` is set (a static member is expected back), so a worker that stops
   cleanly (scale down, deploy) would hold its partitions until its session expires. A
   clean stop must leave at once. The override wraps
   ``AIOKafkaConsumerThread._create_worker_consumer``: once the consumer it builds has
   started, its coordinator's ``close()`` (run only on a clean stop) makes
   ``_maybe_leave_group`` send ``LeaveGroup(group, member_id)`` for the static member as
   it does for a dynamic one (Kafka removes a member named by its member id whatever its
   instance id), bounded by ``CHUNKSTITCH_GROUP_LEAVE_TIMEOUT_S``. Every other caller of
   ``_maybe_leave_group`` (poll-interval expiry, ``unsubscribe``) keeps aiokafka's
   behaviour. A killed worker runs no ``close()`` and sends nothing.

``tests/unit/test_faust_static.py`` fails, naming the symbol, when any of these faust or
aiokafka internals change.

The embedded broker (Tansu 0.6.0) accepts JoinGroup v5 with an instance id but a group of
two static aiokafka members never becomes stable on it (each member's assignment is
revoked within a second, every ~6.5 s): the setting is off by default and must stay off
there. On Apache Kafka (>= 2.3) static membership works as described.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import faust

from processor.logs import get_logger
from processor.settings import Settings

__all__ = ["install_static_membership", "resolve_instance_id"]

log = get_logger("chunkstitch.worker")

_state: dict[str, float] = {"leave_timeout_s": 5.0}


def resolve_instance_id(value: str | None) -> str | None:
    """The configured instance id with ``{hostname}`` replaced; None (or empty) = off."""
    if not value:
        return None
    return value.replace("{hostname}", socket.gethostname())


def install_static_membership(app: faust.App, settings: Settings) -> None:
    """Give ``app``'s worker consumer the configured instance id (if any) and make it
    leave the group when it stops cleanly."""
    instance_id = resolve_instance_id(settings.group_instance_id)
    if instance_id is None:
        return
    app.conf.consumer_group_instance_id = instance_id
    _state["leave_timeout_s"] = settings.group_leave_timeout_s
    _wrap_consumer_factory()
    log.info("static group membership", group_instance_id=instance_id)


def _wrap_consumer_factory() -> None:
    from faust.transport.drivers import aiokafka as driver

    thread: Any = driver.AIOKafkaConsumerThread
    if getattr(thread, "_chunkstitch_static", False):
        return
    original = thread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        start = consumer.start

        async def start_then_patch() -> None:
            await start()
            _leave_on_close(consumer._coordinator)

        consumer.start = start_then_patch
        return consumer

    thread._create_worker_consumer = create
    thread._chunkstitch_static = True


def _leave_on_close(coordinator: Any) -> None:
    """Make a clean ``close()`` of this coordinator send LeaveGroup for its static member."""
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.group import LeaveGroupRequest

    if coordinator is None or getattr(coordinator, "_chunkstitch_leave", False):
        return
    closing = {"now": False}
    original_close = coordinator.close
    original_leave = coordinator._maybe_leave_group

    async def close() -> None:
        closing["now"] = True
        await original_close()

    async def maybe_leave_group() -> None:
        # joined = a generation id >= 0 (aiokafka's "none" is -1; Kafka's first is 1 but
        # the embedded broker's is 0, where aiokafka's own "> 0" check never leaves)
        if not (closing["now"] and coordinator.generation >= 0 and coordinator.member_id):
            await original_leave()
            return
        request = LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
        try:
            response = await asyncio.wait_for(
                coordinator._send_req(request), _state["leave_timeout_s"]
            )
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "could not leave the consumer group on shutdown; the other workers take "
                "over this worker's partitions when its session times out",
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            log.info(
                "left the consumer group on shutdown",
                member_id=coordinator.member_id,
                error_code=getattr(response, "error_code", None),
            )
        coordinator.reset_generation()

    coordinator.close = close
    coordinator._maybe_leave_group = maybe_leave_group
    coordinator._chunkstitch_leave = True
