"""The functional core stays pure: no Kafka clients, no logging, no clock, no OS."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import processor.core

FORBIDDEN = {
    "faust",
    "mode",
    "aiokafka",
    "kafka",
    "confluent_kafka",
    "structlog",
    "logging",
    "os",
    "time",
    "datetime",
    "asyncio",
    "socket",
    "subprocess",
    "random",
}
CORE = Path(processor.core.__file__).parent
MODULES = sorted(CORE.glob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module.startswith("processor.") and not node.module.startswith(
                "processor.core"
            ):
                names.add(node.module)
    return names


def test_core_has_modules() -> None:
    assert len(MODULES) >= 5


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_module_imports_nothing_impure(path: Path) -> None:
    imported = _imports(path)
    assert not imported & FORBIDDEN, f"{path.name} imports {sorted(imported & FORBIDDEN)}"
    shell = {m for m in imported if m.startswith("processor.")}
    assert not shell, f"{path.name} imports the imperative shell: {sorted(shell)}"


def test_topics_imports_no_kafka_client() -> None:
    import topics

    for path in Path(topics.__file__).parent.glob("*.py"):
        assert not _imports(path) & {"faust", "aiokafka", "kafka", "confluent_kafka"}, path.name


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom time import monotonic\nfrom processor.worker import x\n")
    assert {"os", "time"} <= _imports(bad)
    assert "processor.worker" in _imports(bad)
