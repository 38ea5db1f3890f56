"""Shared fixtures. Integration tests run against the real embedded broker (Tansu)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.broker import EmbeddedBroker

_INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real embedded broker on 127.0.0.1 and a free port, for the whole session.

    Yields its bootstrap address ``127.0.0.1:PORT``. Tests isolate themselves with
    unique topic names (``settings_for``) rather than restarting the broker.
    """
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as running:
        yield running.bootstrap
