"""Consumer record handling without a broker: validation, duplicates window, filters, offsets.

Only ``assignment()`` of the aiokafka consumer is stood in for (the partition is
assigned); fetching and committing are covered on the real broker in
tests/integration/test_clients_consume.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from processor.clients import Consumer, InvalidRecord
from processor.core import assemble_many, parse_chunk
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks

TOPIC = "responses"
TP = TopicPartition(TOPIC, 0)


class _Assigned:
    def assignment(self) -> set[TopicPartition]:
        return {TP}


def _consumer(**kwargs: Any) -> Consumer:
    consumer = Consumer(Settings(broker="127.0.0.1:9"), topic=TOPIC, **kwargs)
    consumer._consumer = _Assigned()
    return consumer


def _record(offset: int, value: bytes | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, b"k", value, None, 1, len(value or b""), ())


def _value(cid: str, tenant: str = "t", finished: bool = True) -> bytes:
    chunks = fake_chunks(cid, ["a", "b"])
    (response,) = assemble_many(parse_chunk(c) for c in (chunks if finished else chunks[:3]))
    response.chunkstitch.tenant = tenant
    return response.to_json()


def test_duplicates_are_dropped_within_a_bounded_window() -> None:
    consumer = _consumer(dedupe_window=2)
    ids = ["a", "b", "a", "c", "a"]  # 'a' is forgotten once 'b' and 'c' came after it
    got = [consumer._accept(_record(i, _value(cid))) for i, cid in enumerate(ids)]
    assert [r.id if r else None for r in got] == ["a", "b", None, "c", None]
    assert consumer.stats.duplicates == 2
    window = _consumer(dedupe_window=1)
    got = [window._accept(_record(i, _value(cid))) for i, cid in enumerate(["a", "b", "a"])]
    assert [r.id if r else None for r in got] == ["a", "b", "a"]


def test_invalid_records_are_counted_and_skipped_or_raised() -> None:
    consumer = _consumer()
    assert consumer._accept(_record(0, b"not json")) is None
    assert consumer._accept(_record(1, b'{"id": "x"}')) is None  # no chunkstitch block
    assert consumer.stats.invalid == 2
    strict = _consumer(raise_invalid=True)
    with pytest.raises(InvalidRecord, match=r"responses/0@7 is not a finished response"):
        strict._accept(_record(7, b"[]"))
    assert strict._done == {TP: 8}  # skipped: committed past it


def test_tombstones_are_skipped_silently() -> None:
    consumer = _consumer()
    assert consumer._accept(_record(0, None)) is None
    assert consumer.stats.invalid == 0


def test_tenant_and_status_filters() -> None:
    consumer = _consumer(tenant="acme", status=["complete"])
    assert consumer._accept(_record(0, _value("a", "acme"))) is not None
    assert consumer._accept(_record(1, _value("b", "other"))) is None
    assert consumer._accept(_record(2, _value("c", "acme", finished=False))) is None
    assert consumer.stats.filtered == 2
