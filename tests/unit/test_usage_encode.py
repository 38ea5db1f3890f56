"""The JSON of a /usage page: orjson's bytes read back as the page, json's where orjson
refuses."""

from __future__ import annotations

import json

from processor.usage._serve import _encode


def test_a_page_reads_back_as_itself() -> None:
    page = {
        "rows": [
            {
                "key": {"tenant": "açme ✓", "attributes": {}, "late": False},
                "totals": {"requests": 3, "ttfc_ms_buckets": (0, 2, 1)},
                "ttfc_ms_p50": None,
                "cost_usd": 1.5e-05,
            }
        ],
        "next_cursor": None,
    }
    body = _encode(page)
    assert b" " not in body.replace("açme ✓".encode(), b"")  # compact
    assert json.loads(body) == json.loads(json.dumps(page))


def test_an_integer_beyond_64_bits_still_encodes() -> None:
    page = {"rows": [{"totals": {"cost_nano_usd": 2**70}}], "next_cursor": None}
    assert json.loads(_encode(page))["rows"][0]["totals"]["cost_nano_usd"] == 2**70
