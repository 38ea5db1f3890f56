"""Static group membership (processor/worker/_faust.py): the faust and aiokafka
internals it relies on, named in each failure, and its leave-on-clean-close logic."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path
from typing import Any

import pytest

from processor.settings import Settings
from processor.worker._faust import _leave_on_close, resolve_instance_id


def test_static_membership_is_off_by_default() -> None:
    """Off unless configured: on the embedded broker (Tansu 0.6.0) a group of two static
    members never becomes stable (each assignment is revoked within a second, every
    ~6.5 s), so neither the tests nor the demo may turn it on. deploy/ turns it on for
    Apache Kafka."""
    assert Settings().group_instance_id is None
    assert resolve_instance_id(None) is None
    assert resolve_instance_id("") is None


def test_hostname_placeholder_is_replaced() -> None:
    assert resolve_instance_id("worker-{hostname}") == f"worker-{socket.gethostname()}"
    assert resolve_instance_id("pod-7") == "pod-7"


async def test_faust_passes_its_instance_id_setting_to_the_aiokafka_consumer(
    tmp_path: Path,
) -> None:
    from processor.worker._app import create_app

    app = create_app(Settings(group_instance_id="pod-3", data_dir=str(tmp_path)))
    consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
    try:
        assert consumer._group_instance_id == "pod-3", (
            "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._create_worker_consumer "
            "no longer passes conf.consumer_group_instance_id to AIOKafkaConsumer"
        )
        assert getattr(consumer.start, "__name__", "") == "start_then_patch", (
            "the consumer built by AIOKafkaConsumerThread._create_worker_consumer is not "
            "the one whose start() _faust wraps"
        )
    finally:
        await consumer.stop()


def test_aiokafka_internals_the_override_relies_on() -> None:
    from aiokafka.consumer.consumer import AIOKafkaConsumer
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.protocol.group import LeaveGroupRequest

    for name in ("close", "_maybe_leave_group", "_send_req", "reset_generation"):
        assert callable(getattr(GroupCoordinator, name, None)), (
            f"aiokafka GroupCoordinator.{name} is gone: review processor/worker/_faust.py"
        )
    leave_src = inspect.getsource(GroupCoordinator._maybe_leave_group)
    assert "_group_instance_id is None" in leave_src, (
        "aiokafka GroupCoordinator._maybe_leave_group no longer skips static members: the "
        "leave-on-close override in processor/worker/_faust.py may be unneeded"
    )
    assert "self._maybe_leave_group()" in inspect.getsource(GroupCoordinator.close), (
        "aiokafka GroupCoordinator.close no longer calls _maybe_leave_group"
    )
    init_src = inspect.getsource(GroupCoordinator.__init__)
    for attr in ("self.group_id", "self._group_instance_id"):
        assert attr in init_src, f"aiokafka GroupCoordinator has no {attr} any more"
    assert list(inspect.signature(LeaveGroupRequest).parameters) == ["group", "member_id"], (
        "aiokafka LeaveGroupRequest(group, member_id) changed its signature"
    )
    assert "self._coordinator = GroupCoordinator(" in inspect.getsource(AIOKafkaConsumer.start)
    from aiokafka.protocol.commit import OffsetCommitRequest

    assert OffsetCommitRequest.DEFAULT_GENERATION_ID == -1, (
        "aiokafka's 'no generation' (OffsetCommitRequest.DEFAULT_GENERATION_ID) is no longer "
        "-1: the 'joined' check in processor/worker/_faust.py relies on it"
    )


class _Coordinator:
    """The few attributes of aiokafka's GroupCoordinator that the override touches."""

    def __init__(self) -> None:
        self.group_id = "g"
        self.member_id = "pod-3-abc"
        self.generation = 4
        self.sent: list[Any] = []
        self.plain_leaves = 0

    async def _send_req(self, request: Any) -> Any:
        self.sent.append(request)
        return type("Response", (), {"error_code": 0})()

    async def _maybe_leave_group(self) -> None:
        self.plain_leaves += 1  # aiokafka's own: nothing for a static member

    async def close(self) -> None:
        await self._maybe_leave_group()

    def reset_generation(self) -> None:
        self.generation = -1
        self.member_id = ""


async def test_a_clean_close_sends_leave_group_for_the_static_member() -> None:
    coordinator = _Coordinator()
    _leave_on_close(coordinator)
    await coordinator._maybe_leave_group()  # e.g. poll-interval expiry: aiokafka's path
    assert coordinator.plain_leaves == 1
    assert not coordinator.sent
    await coordinator.close()
    assert len(coordinator.sent) == 1
    leave = coordinator.sent[0]
    assert (leave._group, leave._member_id) == ("g", "pod-3-abc")
    assert coordinator.generation == -1


async def test_generation_zero_is_joined_too() -> None:
    """The embedded broker numbers its first generation 0 (Kafka starts at 1)."""
    coordinator = _Coordinator()
    coordinator.generation = 0
    _leave_on_close(coordinator)
    await coordinator.close()
    assert len(coordinator.sent) == 1


@pytest.mark.parametrize("member_id", ["", "m-1"])
async def test_close_before_joining_sends_nothing(member_id: str) -> None:
    coordinator = _Coordinator()
    coordinator.generation = -1  # aiokafka's "no generation"
    coordinator.member_id = member_id
    _leave_on_close(coordinator)
    await coordinator.close()
    assert not coordinator.sent
    assert coordinator.plain_leaves == 1
