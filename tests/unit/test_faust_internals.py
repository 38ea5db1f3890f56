"""The private faust-streaming and aiokafka internals that processor/worker/_faust.py relies
on. When an upgrade changes one of them, this fails and names it: read the module's
docstring, check the new code, then update the override and the pins together."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest

from processor.worker import _faust


def test_the_installed_versions_are_the_tested_ones() -> None:
    assert version("faust-streaming") in _faust.FAUST_TESTED, (
        f"faust-streaming {version('faust-streaming')} is not among the versions "
        f"processor/worker/_faust.py was tested with {_faust.FAUST_TESTED}"
    )
    assert version("aiokafka") in _faust.AIOKAFKA_TESTED, (
        f"aiokafka {version('aiokafka')} is not among {_faust.AIOKAFKA_TESTED}"
    )


CONSUMER_METHODS = {
    "_drain_messages": ["self", "fetcher"],
    "_wait_next_records": ["self", "timeout"],
    "_add_gap": ["self", "tp", "offset_from", "offset_to"],
    "perform_seek": ["self"],
    "commit": None,
    "ack": ["self", "message"],
    "_new_offset": ["self", "tp"],
}


@pytest.mark.parametrize("name", sorted(CONSUMER_METHODS))
def test_faust_consumer_methods(name: str) -> None:
    from faust.transport.consumer import Consumer

    method = getattr(Consumer, name, None)
    assert method is not None, f"faust.transport.consumer.Consumer.{name} is gone"
    expected = CONSUMER_METHODS[name]
    if expected is not None:
        params = list(inspect.signature(method).parameters)
        assert params == expected, f"Consumer.{name} now takes {params}, not {expected}"


def test_faust_consumer_state_the_batch_path_maintains() -> None:
    from faust.transport.consumer import Consumer

    source = inspect.getsource(Consumer.__init__)
    for attr in (
        "_acked",
        "_acked_index",
        "_read_offset",
        "_committed_offset",
        "_gap",
        "_waiting_for_ack",
        "_buffered_partitions",
        "_commit_every",
        "suspend_flow",
    ):
        assert f"self.{attr} =" in source, f"faust Consumer no longer sets self.{attr}"
    ack = inspect.getsource(Consumer.ack)
    for step in ("_acked_index[tp]", "_acked[tp]", "_n_acked += 1", "_committed_offset[tp]"):
        assert step in ack, f"faust Consumer.ack no longer does {step!r}: update ack_offsets"
    assert "wait_first(" in inspect.getsource(Consumer._drain_messages)


def test_faust_ack_lock_and_driver_hooks() -> None:
    from faust.transport.drivers import aiokafka as driver
    from faust.types import tuples

    assert hasattr(tuples, "ack_lock"), "faust.types.tuples.ack_lock is gone"
    assert hasattr(driver.AIOKafkaConsumerThread, "_create_worker_consumer")
    assert "_max_poll_records" in inspect.getsource(driver.AIOKafkaConsumerThread.getmany)
    params = list(inspect.signature(driver.Transport.create_consumer).parameters)
    assert params[:2] == ["self", "callback"], f"Transport.create_consumer takes {params}"


def test_aiokafka_coordinator_request_hook() -> None:
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.protocol.group import HeartbeatRequest, SyncGroupRequest

    params = list(inspect.signature(GroupCoordinator._send_req).parameters)
    assert params == ["self", "request"], f"GroupCoordinator._send_req takes {params}"
    heartbeat = inspect.getsource(GroupCoordinator._do_heartbeat)
    assert "HeartbeatRequest(" in heartbeat
    assert "self._send_req(request)" in heartbeat
    assert inspect.isclass(HeartbeatRequest)
    assert inspect.isclass(SyncGroupRequest)


def test_the_batch_consumer_is_faust_s_aiokafka_consumer_with_one_method_overridden() -> None:
    from faust.transport.drivers.aiokafka import Consumer

    cls = _faust.BatchConsumer()
    assert issubclass(cls, Consumer)
    own = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("__")}
    # only _drain_messages replaces one of faust's; the rest are new names, and a faust
    # upgrade that adds one of them would be silently shadowed
    overridden = {n for n in own if hasattr(Consumer, n)}
    assert overridden == {"_drain_messages"}, f"the batch consumer now shadows {overridden}"
    assert own == {"_drain_messages", "_drain_batches", "_fetch_tag", "_reseek", "_handle_entries"}


def test_the_rebalance_marks_the_fetch_ahead_relies_on() -> None:
    # _FetchAhead tags each fetch with (app.rebalancing_count, app.consumer_generation_id):
    # the count must move at the very start of a rebalance (in the consumer thread's
    # revocation callback), the generation at the assignment, before the recovery seek.
    from faust.app.base import App
    from faust.transport.drivers import aiokafka as driver

    start = inspect.getsource(App.on_rebalance_start)
    assert "self.rebalancing_count += 1" in start, "App.on_rebalance_start no longer counts"
    revoked = inspect.getsource(driver.ConsumerRebalanceListener.on_partitions_revoked)
    assert "on_rebalance_start()" in revoked, (
        "aiokafka driver's on_partitions_revoked no longer calls app.on_rebalance_start"
    )
    assigned = inspect.getsource(driver.ConsumerRebalanceListener.on_partitions_assigned)
    assert "consumer_generation_id = generation" in assigned, (
        "aiokafka driver's on_partitions_assigned no longer sets app.consumer_generation_id"
    )


def test_the_seek_back_rewinds_what_seek_to_committed_leaves_in_place() -> None:
    # _reseek drops fetched records and seeks back. aiokafka's seek_to_committed moves only
    # partitions with a committed offset > 0; faust's perform_seek then leaves their read
    # offset None (or 0), and _reseek seeks those to their beginning through the consumer
    # thread. If aiokafka starts seeking every partition, the rewind is merely redundant;
    # if these names change, the rewind is gone and dropped records would be lost.
    from aiokafka import AIOKafkaConsumer
    from faust.transport.consumer import Consumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    committed = inspect.getsource(AIOKafkaConsumer.seek_to_committed)
    assert "offset > 0" in committed or "offset is not None" in committed, committed
    assert "_read_offset" in inspect.getsource(Consumer.perform_seek)
    params = list(inspect.signature(AIOKafkaConsumerThread.seek_to_beginning).parameters)
    assert params == ["self", "partitions"], f"seek_to_beginning takes {params}"
    assert "can_resume_flow" in inspect.getsource(Consumer.__init__)
    assert "can_resume_flow" in inspect.getsource(Consumer._wait_next_records)
