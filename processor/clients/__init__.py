"""Client libraries for the two ends of chunkstitch.

* :class:`Publisher` (gateway side): publishes every ``chat.completion.chunk`` of a
  stream with the record contract (key, sequence numbers, end-of-stream marker).
* :class:`SyncPublisher` (WSGI / threaded gateways): the same publisher behind a blocking,
  thread-safe API (one background thread runs the async publisher).
* :func:`tee_chunks` / :func:`tee_sse` (and ``tee_chunks_sync`` / ``tee_sse_sync``): pass a
  stream through unchanged while publishing it.
* :class:`Consumer` (downstream side): ``async for response in consumer`` over finished
  ``topics.ChatCompletion`` responses, at-least-once, duplicates dropped; and
  ``await consumer.wait_for(completion_id)`` for request/response callers.
"""

from processor.clients._consumer import Consumer, ConsumerStats, StartPosition
from processor.clients._errors import (
    BrokerUnavailable,
    ClientError,
    DeliveryError,
    InvalidRecord,
    PublishError,
    UnknownTopic,
    WaitTimeout,
)
from processor.clients._publisher import ErrorCallback, Publisher, PublisherStats, StreamHandle
from processor.clients._sync import SyncPublisher, SyncStreamHandle
from processor.clients._tee import tee_chunks, tee_chunks_sync, tee_sse, tee_sse_sync
from processor.clients._waiter import ResponseWaiter, partition_for

__all__ = [
    "BrokerUnavailable",
    "ClientError",
    "Consumer",
    "ConsumerStats",
    "DeliveryError",
    "ErrorCallback",
    "InvalidRecord",
    "PublishError",
    "Publisher",
    "PublisherStats",
    "ResponseWaiter",
    "StartPosition",
    "StreamHandle",
    "SyncPublisher",
    "SyncStreamHandle",
    "UnknownTopic",
    "WaitTimeout",
    "partition_for",
    "tee_chunks",
    "tee_chunks_sync",
    "tee_sse",
    "tee_sse_sync",
]
