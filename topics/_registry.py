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

Role = Literal[
    "chunks", "responses", "rollups", "rollups-hourly", "usage-checkpoints", "deadletter", "ledger"
]


@dataclass(frozen=True, slots=True)
class TopicNames:
    """Topic names and the partition count, as configured (see Settings)."""

    chunks: str = "chunkstitch.chunks"
    responses: str = "chunkstitch.responses"
    rollups: str = "chunkstitch.usage-rollups"
    deadletter: str = "chunkstitch.deadletter"
    ledger: str = "chunkstitch.ledger"
    partitions: int = 6
    # --- usage rollups: names and retention (bounded-state issue) -----------------------
    rollups_hourly: str = "chunkstitch.usage-rollups-1h"
    usage_checkpoints: str = "chunkstitch.usage-rollups-checkpoints"
    chunks_retention_ms: int = DAY_MS
    responses_retention_ms: int = 7 * DAY_MS
    rollups_retention_ms: int = 2 * DAY_MS
    """1-minute rollups: the live read model's recent period (1 h and 1 d come from the
    hourly topic)."""
    rollups_hourly_retention_ms: int = 35 * DAY_MS
    deadletter_retention_ms: int = 14 * DAY_MS
    ledger_retention_ms: int = DAY_MS
    """At least as long as the worker uses the ledger (its emitted-ids memory)."""


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
    from topics._usage_schema import checkpoint_schema, rollup_schema

    return [
        TopicSpec(
            "chunks",
            n.chunks,
            n.partitions,
            {"cleanup.policy": "delete", "retention.ms": str(n.chunks_retention_ms)},
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
            {
                "cleanup.policy": "compact,delete",
                "retention.ms": str(n.responses_retention_ms),
                # a re-emitted duplicate must still meet its original in the usage fold's
                # dedup re-read (usage_dedup_s <= this)
                "min.compaction.lag.ms": str(HOUR_MS),
            },
            "completion id",
            ChatCompletion,
            "Finished chat.completion objects with the chunkstitch metadata block.",
        ),
        TopicSpec(
            "rollups",
            n.rollups,
            n.partitions,
            _rollup_configs(n.rollups_retention_ms),
            _ROLLUP_KEY,
            rollup_schema(),
            "1-minute usage rollups: absolute totals per window and dimensions (upsert "
            "them); a final record when the window closes; late data as increments keyed "
            "by their source offset. Written to partition = source partition.",
        ),
        TopicSpec(
            "rollups-hourly",
            n.rollups_hourly,
            n.partitions,
            _rollup_configs(n.rollups_hourly_retention_ms),
            _ROLLUP_KEY,
            rollup_schema(),
            "The same rollups in 1-hour windows (1-day figures are summed from them), kept long.",
        ),
        TopicSpec(
            "usage-checkpoints",
            n.usage_checkpoints,
            n.partitions,
            {"cleanup.policy": "compact", "segment.ms": str(HOUR_MS)},
            "responses partition number (written to that partition number)",
            checkpoint_schema(),
            "The usage fold of each responses partition (open buckets, stream time) and "
            "the source offset it reflects: recovery starts from it.",
        ),
        TopicSpec(
            "deadletter",
            n.deadletter,
            n.partitions,
            {"cleanup.policy": "delete", "retention.ms": str(n.deadletter_retention_ms)},
            "the original record's key",
            DeadLetter,
            "Records the worker could not use, with the original bytes and the reason.",
        ),
        TopicSpec(
            "ledger",
            n.ledger,
            n.partitions,
            {"cleanup.policy": "compact,delete", "retention.ms": str(n.ledger_retention_ms)},
            "completion id (written to the chunk's own partition number)",
            None,
            "The worker's emitted ledger: one small record per emitted completion "
            "(last source offset), read back after a restart so replayed chunks of "
            "emitted completions are recognised.",
        ),
    ]


_ROLLUP_KEY = "window|size|tenant|model|provider|status|late|source partition[|source offset]"


def _rollup_configs(retention_ms: int) -> dict[str, str]:
    # compact keeps the latest total per bucket, delete drops buckets past the retention;
    # hourly segments let compaction reach records soon (the active segment is never
    # compacted)
    return {
        "cleanup.policy": "compact,delete",
        "retention.ms": str(retention_ms),
        "segment.ms": str(HOUR_MS),
    }
