"""Create and describe chunkstitch's topics (aiokafka admin), from topics/ specs."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from processor.kafka import connection_error
from processor.settings import Settings
from topics import TopicSpec, topic_specs

__all__ = ["TopicState", "create_topics", "describe_topics"]


@dataclass(frozen=True, slots=True)
class TopicState:
    spec: TopicSpec
    exists: bool
    partitions: int | None
    created: bool = False


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        **settings.kafka_kwargs(),
        request_timeout_ms=int(settings.connect_timeout_s * 1000),
    )
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        problem = await connection_error(settings, exc)
        if problem is None:
            raise
        raise problem from exc
    return admin


async def _existing(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    # list first: describing a missing topic makes some brokers auto-create it with
    # default settings (the embedded broker does), which would defeat topics as code.
    present = set(await admin.list_topics()) & set(names)
    found: dict[str, int] = {}
    if not present:
        return found
    for meta in await admin.describe_topics(sorted(present)):
        if meta.get("error_code", 0) == 0 and meta.get("partitions"):
            found[meta["topic"]] = len(meta["partitions"])
    return found


async def create_topics(settings: Settings) -> list[TopicState]:
    """Create every missing chunkstitch topic with its configs; existing ones are reported."""
    specs = topic_specs(settings.topic_names())
    admin = await _admin(settings)
    try:
        existing = await _existing(admin, [s.name for s in specs])
        missing = [s for s in specs if s.name not in existing]
        created: set[str] = set()
        for spec in missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            spec.partitions,
                            settings.replication_factor,
                            topic_configs=dict(spec.configs),
                        )
                    ]
                )
                created.add(spec.name)
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process: fine
        existing = await _existing(admin, [s.name for s in specs])
    finally:
        await admin.close()
    return [
        TopicState(s, s.name in existing, existing.get(s.name), s.name in created) for s in specs
    ]


async def describe_topics(settings: Settings) -> list[TopicState]:
    """Which chunkstitch topics exist on the broker, with their partition counts."""
    specs = topic_specs(settings.topic_names())
    admin = await _admin(settings)
    try:
        existing = await _existing(admin, [s.name for s in specs])
    finally:
        await admin.close()
    return [TopicState(s, s.name in existing, existing.get(s.name)) for s in specs]
