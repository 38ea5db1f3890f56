"""The PostgreSQL side of the usage history, without a server: schema covers every
measure, rows refuse what PostgreSQL cannot store, DSNs are logged without passwords."""

from __future__ import annotations

import re

import pytest

from processor.core import result
from processor.usage._pg import MEASURES, MIGRATIONS, InvalidRollup, redact_dsn, row_of
from topics import UsageKey, UsageTotals


def test_every_rollup_measure_has_a_column_in_the_migrations() -> None:
    ddl = "\n".join(sql for _, _, sql in MIGRATIONS)
    columns = set(
        re.findall(r"^\s+(?:ADD COLUMN\s+)?(\w+) (?:bigint|integer|text|boolean)", ddl, re.M)
    )
    missing = set(UsageTotals.model_fields) - columns
    assert not missing, f"add a migration with columns for {sorted(missing)}"
    assert set(MEASURES) == set(UsageTotals.model_fields)
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def _key(**update: object) -> UsageKey:
    base = UsageKey(
        window_start_ms=60_000,
        window_ms=60_000,
        tenant="t",
        model="m",
        provider="p",
        status="complete",
    )
    return base.model_copy(update=update)


def test_rows_refuse_what_postgresql_cannot_store() -> None:
    row = row_of(result(_key(), UsageTotals(requests=2), 3), 1, 42)
    assert row[:12] == (60_000, 60_000, "t", "m", "p", "complete", False, 3, -1, "unknown", "{}", 2)
    assert row[-3:] == (False, 1, 42)
    with pytest.raises(InvalidRollup, match="NUL"):
        row_of(result(_key(tenant="a\x00"), UsageTotals(), 0), 0, 0)
    with pytest.raises(InvalidRollup, match="64-bit"):
        row_of(result(_key(), UsageTotals(prompt_tokens=2**64), 0), 0, 0)
    with pytest.raises(InvalidRollup, match="buckets"):
        row_of(result(_key(), UsageTotals(ttfc_ms_buckets=(1, 2)), 0), 0, 0)
    with pytest.raises(InvalidRollup, match="positive window"):
        row_of(result(_key(window_ms=0), UsageTotals(), 0), 0, 0)


def test_dsn_is_logged_without_its_password() -> None:
    shown = redact_dsn("postgresql://billing:s3cr3t@db.internal:5432/usage")
    assert shown == "postgresql://billing:***@db.internal:5432/usage"
    assert redact_dsn("postgresql://db/usage") == "postgresql://db/usage"
