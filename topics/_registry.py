"""Every topic chunkstitch uses: name, partitions, configs, key and value schema.

The single source of truth: the admin command, the worker, the clients, the Strimzi
manifests and the docs all read :func:`topic_specs`. Names and partition counts come
from :class:`processor.settings.Settings` (passed in as plain values: ``topics`` imports
nothing from the shell).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from topics._deadletter import DeadLetter
from topics._response import ChatCompletion

__all__ = ["TopicNames", "TopicSpec", "topic_specs"]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

Role = Literal["chunks", "responses", "rollups", "deadletter", "ledger"]


@dataclass(frozen=True, slots=True)
class TopicNames:
    """Topic names and the partition count, as configured (see Settings)."""

    chunks: str = "chunkstitch.chunks"
    responses: str = "chunkstitch.responses"
    rollups: str = "chunkstitch.usage-rollups"
    deadletter: str = "chunkstitch.deadletter"
    ledger: str = "chunkstitch.ledger"
    partitions: int = 6


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic: what it holds and how the broker must keep it."""

    role: Role
    name: str
    partitions: int
    configs: dict[str, str]
    key: str
    value_schema: type[BaseModel] | None
    description: str
    value_format: str = "JSON"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def cleanup_policy(self) -> str:
        return self.configs["cleanup.policy"]


def topic_specs(names: TopicNames | None = None) -> list[TopicSpec]:
    """The specs of every chunkstitch topic, for the given names and partition count."""
    n = names or TopicNames()
    from topics._usage_schema import rollup_schema

    return [
        TopicSpec(
            "chunks",
            n.chunks,
            n.partitions,
            {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)},
            "completion id (optional: bare records are re-keyed by the worker)",
            None,
            "Every chat.completion.chunk as the provider sent it; record contract headers "
            "cs-seq, cs-end, cs-tenant, cs-provider, cs-started-at.",
            value_format="raw provider JSON (snake_case or camelCase); empty on end markers",
        ),
        TopicSpec(
            "responses",
            n.responses,
            n.partitions,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": str(HOUR_MS)},
            "completion id",
            ChatCompletion,
            "Finished chat.completion objects with the chunkstitch metadata block.",
        ),
        TopicSpec(
            "rollups",
            n.rollups,
            n.partitions,
            {"cleanup.policy": "compact"},
            "window|size|tenant|model|provider|status|source partition",
            rollup_schema(),
            "Usage rollups as absolute totals per window and dimensions (upsert them).",
        ),
        TopicSpec(
            "deadletter",
            n.deadletter,
            n.partitions,
            {"cleanup.policy": "delete", "retention.ms": str(14 * DAY_MS)},
            "the original record's key",
            DeadLetter,
            "Records the worker could not use, with the original bytes and the reason.",
        ),
        TopicSpec(
            "ledger",
            n.ledger,
            n.partitions,
            {"cleanup.policy": "compact,delete", "retention.ms": str(DAY_MS)},
            "completion id (written to the chunk's own partition number)",
            None,
            "The worker's emitted ledger: one small record per emitted completion "
            "(last source offset), read back after a restart so replayed chunks of "
            "emitted completions are recognised.",
        ),
    ]
