"""End to end through the worker: publisher/CLI -> chunk topic -> `python -m processor worker`
-> response topic -> Consumer/CLI, compared with ``assemble_many`` on the same chunks.

NEEDS THE WORKER (issue 5): every test here starts ``python -m processor worker`` as a
subprocess and creates topics with ``python -m processor topics create``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk as OpenAIChunk

from processor.clients import Consumer, Publisher
from processor.core import assemble_many, parse_chunk
from processor.settings import Settings
from tests.helpers.fake_upstream import fake_chunks
from topics import ChatCompletion

pytestmark = pytest.mark.integration

# The worker's idle timeout is far longer than any wait in this file: an aborted stream
# that arrives here was finished by its end marker, not by the timeout.
IDLE_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def worker_env(broker: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Fresh topics and a running worker subprocess; yields the CHUNKSTITCH_* env."""
    tag = uuid.uuid4().hex[:6]
    env = {
        **os.environ,
        "CHUNKSTITCH_BROKER": broker,
        "CHUNKSTITCH_APP_ID": f"cs-clients-{tag}",
        "CHUNKSTITCH_TOPIC_CHUNKS": f"w-chunks-{tag}",
        "CHUNKSTITCH_TOPIC_RESPONSES": f"w-responses-{tag}",
        "CHUNKSTITCH_TOPIC_ROLLUPS": f"w-rollups-{tag}",
        "CHUNKSTITCH_TOPIC_DEADLETTER": f"w-dead-{tag}",
        "CHUNKSTITCH_PARTITIONS": "3",
        "CHUNKSTITCH_WEB_PORT": str(_free_port()),
        "CHUNKSTITCH_USAGE_PORT": str(_free_port()),
        "CHUNKSTITCH_DATA_DIR": str(tmp_path / "data"),
        "CHUNKSTITCH_SESSION_TIMEOUT_S": "3",
        "CHUNKSTITCH_USAGE_GRACE_S": "0.5",
        "CHUNKSTITCH_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S),
        "CHUNKSTITCH_CONNECT_TIMEOUT_S": "5",
        "CHUNKSTITCH_USAGE_ATTRIBUTES": "feature,env",
    }
    created = subprocess.run(
        [sys.executable, "-m", "processor", "topics", "create"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "processor", "worker"], env=env, stdout=log, stderr=log
    )
    try:
        yield {k: v for k, v in env.items() if k.startswith("CHUNKSTITCH_")}
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        # shown by pytest only when the test failed
        print("--- worker log (tail) ---")
        print((tmp_path / "worker.log").read_text(errors="replace")[-6000:])


def _settings(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def _collect(settings: Settings, ids: set[str]) -> dict[str, ChatCompletion]:
    """Responses until every id arrived (bounded by the consumer's idle timeout)."""
    got: dict[str, ChatCompletion] = {}
    async with Consumer(settings, group_id=None, start="earliest", idle_timeout_s=60) as c:
        async for response in c:
            got[response.id] = response
            if ids <= set(got):
                break
    return got


def _same_content(worker: ChatCompletion, local: ChatCompletion) -> None:
    assert worker.model_dump(exclude={"chunkstitch"}) == local.model_dump(exclude={"chunkstitch"})
    assert worker.chunkstitch.status == local.chunkstitch.status
    assert worker.chunkstitch.chunk_count == local.chunkstitch.chunk_count


async def test_library_publish_and_consume_match_assemble(worker_env: dict[str, str]) -> None:
    settings = _settings(worker_env)
    dict_chunks = fake_chunks("w-dict", ["published", "from", "plain", "dicts"])
    obj_chunks = [
        OpenAIChunk.model_validate(c)
        for c in fake_chunks("w-obj", ["published", "from", "openai", "objects"])[1:]
    ]
    aborted = fake_chunks("w-abort", ["this", "stream", "is", "cut"])[:4]

    async def gateway_that_fails(publisher: Publisher) -> None:
        async with publisher.stream(tenant="acme", provider="openai") as s:
            for chunk in aborted:
                await s.send(chunk)
            raise ConnectionResetError("client went away")

    async with Publisher(settings) as publisher:
        async with publisher.stream(
            tenant="acme",
            provider="azure",
            request_started_at=1,
            user="alice",
            attributes={"feature": "chat", "secret": "not in the allowlist"},
        ) as s:
            for chunk in dict_chunks:
                await s.send(chunk)
            s.mark_done()
        async with publisher.stream(
            tenant="beta", provider="openai", user="bob", attributes={"feature": "search"}
        ) as s:
            for obj in obj_chunks:
                await s.send(obj)
        with pytest.raises(ConnectionResetError):
            await gateway_that_fails(publisher)

    got = await asyncio.wait_for(_collect(settings, {"w-dict", "w-obj", "w-abort"}), 120)
    expected = {
        r.id: r
        for r in assemble_many(
            parse_chunk(c)
            for c in [*dict_chunks, *(o.model_dump(exclude_unset=True) for o in obj_chunks)]
        )
    }
    _same_content(got["w-dict"], expected["w-dict"])
    _same_content(got["w-obj"], expected["w-obj"])
    assert got["w-dict"].chunkstitch.tenant == "acme"
    assert got["w-obj"].chunkstitch.provider == "openai"
    # user and the allowlisted attributes (CHUNKSTITCH_USAGE_ATTRIBUTES=feature,env)
    assert got["w-dict"].chunkstitch.user == "alice"
    assert got["w-dict"].chunkstitch.attributes == {"feature": "chat"}
    assert got["w-obj"].chunkstitch.user == "bob"
    assert got["w-obj"].chunkstitch.attributes == {"feature": "search"}
    assert got["w-abort"].chunkstitch.user is None
    # ... and the rollups group by them (/usage on the worker)
    import httpx

    port = worker_env["CHUNKSTITCH_USAGE_PORT"]  # /usage has its own server and port
    url = f"http://127.0.0.1:{port}/usage?window=1d&by=user,attr.feature"
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(240):  # until the read model has the three completions (or 60 s)
            try:
                response = await client.get(url)
            except httpx.ConnectError:  # the usage server is still starting
                await asyncio.sleep(0.25)
                continue
            if response.status_code == 200:
                rows = response.json()["rows"]
            if sum(r["totals"]["requests"] for r in rows) >= 3:
                break
            await asyncio.sleep(0.25)
    by = {(r["key"]["user"], r["key"]["attributes"]["feature"]): r for r in rows}
    assert {k: r["totals"]["requests"] for k, r in by.items()} == {
        ("alice", "chat"): 1,
        ("bob", "search"): 1,
        ("unknown", "unknown"): 1,
    }
    assert by[("alice", "chat")]["totals"]["prompt_tokens"] == (
        got["w-dict"].usage.prompt_tokens if got["w-dict"].usage else 0
    )
    # aborted: finished at once (the idle timeout is IDLE_TIMEOUT_S) and incomplete
    assert got["w-abort"].chunkstitch.status == "incomplete"
    (local_abort,) = assemble_many(parse_chunk(c) for c in aborted)
    assert got["w-abort"].choices[0].message.content == local_abort.choices[0].message.content


async def test_cli_publish_and_cli_consume_match_assemble(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    chunks = (
        fake_chunks("w-cli-1", ["one", "two", "three"])
        + fake_chunks("w-cli-2", ["four", "five"])[1:]
    )
    capture = tmp_path / "capture.jsonl"
    capture.write_text("".join(json.dumps(c) + "\n" for c in chunks))
    env = {**os.environ, **worker_env}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "processor", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    published = await asyncio.to_thread(
        run,
        "publish",
        str(capture),
        "--tenant",
        "cli",
        "--keep-ids",
        "--user",
        "carol",
        "--attr",
        "env=test",
    )
    assert published.returncode == 0, published.stderr
    consumed = await asyncio.to_thread(
        run, "consume", "--from-beginning", "--json", "--limit", "2", "--timeout", "60"
    )
    assert consumed.returncode == 0, consumed.stderr
    lines = consumed.stdout.splitlines()
    got = {r.id: r for r in (ChatCompletion.model_validate_json(x) for x in lines)}
    assert set(got) == {"w-cli-1", "w-cli-2"}
    for local in assemble_many(parse_chunk(c) for c in chunks):
        _same_content(got[local.id], local)
        assert got[local.id].chunkstitch.tenant == "cli"
        assert got[local.id].chunkstitch.user == "carol"
        assert got[local.id].chunkstitch.attributes == {"env": "test"}
    bad = await asyncio.to_thread(run, "publish", str(capture), "--attr", "Bad=x")
    assert bad.returncode == 2
    assert "attribute name 'Bad'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


async def test_example_gateway_to_worker_to_consumer(worker_env: dict[str, str]) -> None:
    import httpx

    from examples.gateway import GatewaySettings, create_app
    from tests.helpers.fake_upstream import fake_upstream_app, running_server

    settings = _settings(worker_env)
    async with running_server(fake_upstream_app()) as upstream_url:
        gateway = create_app(
            GatewaySettings(upstream_url=upstream_url + "/v1", gateway_provider="fake"), settings
        )
        async with (
            running_server(gateway) as gateway_url,
            httpx.AsyncClient(base_url=gateway_url, timeout=30) as client,
        ):
            request = {
                "model": "fake-model",
                "stream": True,
                "messages": [{"role": "user", "content": "through the whole pipeline"}],
            }
            response = await client.post(
                "/v1/chat/completions", json=request, headers={"X-Tenant": "gw"}
            )
    assert response.status_code == 200
    received = [
        json.loads(event[6:])
        for event in response.content.split(b"\n\n")
        if event.startswith(b"data: {")
    ]
    cid = received[-1]["id"]
    got = await asyncio.wait_for(_collect(settings, {cid}), 120)
    (local,) = assemble_many(parse_chunk(c) for c in received)
    # the gateway asked the upstream for usage (the client did not, so it never saw the
    # usage-only chunk): the worker's response has it, the rest is what the client got
    assert got[cid].usage is not None
    assert got[cid].usage.completion_tokens == 4  # "through the whole pipeline"
    assert got[cid].chunkstitch.usage_reported is True
    assert local.usage is None
    got[cid].usage = None
    got[cid].chunkstitch.chunk_count -= 1
    _same_content(got[cid], local)
    assert got[cid].choices[0].message.content == "through the whole pipeline"
    assert got[cid].chunkstitch.tenant == "gw"
    assert got[cid].chunkstitch.provider == "fake"


async def test_tee_chunks_of_aiter_sse_data_ends_at_done_and_wait_for_gets_it(
    worker_env: dict[str, str],
) -> None:
    """Issue 15: httpx-sse ``aiter_sse()`` data strings teed with ``tee_chunks`` published
    "[DONE]" as a chunk, and the completion came out incomplete after the idle timeout.
    Now the end marker follows [DONE] at once and the response is complete; a caller
    that waits for the id from before the stream starts gets it (ResponseWaiter)."""
    import httpx
    from httpx_sse import aconnect_sse

    from processor.clients import ResponseWaiter, tee_chunks
    from tests.helpers.fake_upstream import fake_upstream_app, running_server

    settings = _settings(worker_env)
    request = {"model": "m", "stream": True, "messages": [{"content": "done means done"}]}
    async with (
        running_server(fake_upstream_app()) as upstream_url,
        Publisher(settings) as publisher,
        ResponseWaiter(settings) as waiter,
        httpx.AsyncClient(timeout=30) as client,
        aconnect_sse(client, "POST", upstream_url + "/v1/chat/completions", json=request) as src,
    ):
        stream = publisher.stream(tenant="sse")
        data = []
        wait: asyncio.Task[ChatCompletion] | None = None
        async for item in tee_chunks((e.data async for e in src.aiter_sse()), stream):
            data.append(item)
            if wait is None and stream.completion_id:  # known from the first real chunk
                wait = asyncio.create_task(waiter.wait_for(stream.completion_id, timeout=60))
        assert wait is not None
        response = await wait
    assert data[-1] == "[DONE]"
    meta = response.chunkstitch
    assert (meta.status, meta.missing_chunks, meta.reason) == ("complete", 0, None)
    assert meta.chunk_count == len(data) - 1
    assert response.choices[0].message.content == "done means done"
