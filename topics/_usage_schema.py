"""Indirection so the registry can name the rollup schema before it exists."""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["checkpoint_schema", "rollup_schema"]


def rollup_schema() -> type[BaseModel] | None:
    """The usage-rollup value model, once the usage issue lands (None until then)."""
    try:
        from topics._usage import UsageRollup  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    model: type[BaseModel] = UsageRollup
    return model


def checkpoint_schema() -> type[BaseModel]:
    """The usage-checkpoint value model."""
    from topics._usage import UsageCheckpoint

    return UsageCheckpoint
