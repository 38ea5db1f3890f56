"""A local fake OpenAI-compatible upstream (streaming SSE) and an in-loop uvicorn runner."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["fake_chunks", "fake_upstream_app", "running_server"]

_ids = itertools.count(1)


def fake_chunks(
    completion_id: str, words: list[str], *, usage: bool = True
) -> list[dict[str, Any]]:
    """The chunks the fake upstream streams: Azure-style placeholder, role, one per word,
    finish, usage."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": 1700000000}
    base["model"] = "fake-model"
    out: list[dict[str, Any]] = [
        {
            "id": "",
            "object": "",
            "created": 0,
            "model": "",
            "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        },
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    ]
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        out.append({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
    out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        n = len(words)
        out.append(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
            }
        )
    return out


def fake_upstream_app() -> Starlette:
    """POST /v1/chat/completions: echoes the last user message word by word as SSE.

    Like OpenAI: the usage-only chunk is sent only when the request sets
    ``stream_options.include_usage``; every response carries an ``x-request-id``
    header (``req-<n>``) and ``openai-processing-ms``. A message starting with ``hang``
    stalls after two chunks.
    """
    seen: list[dict[str, Any]] = []

    async def chat(request: Request) -> Response:
        payload = await request.json()
        seen.append(payload)
        text = str(payload["messages"][-1]["content"])
        n = next(_ids)
        cid = f"chatcmpl-fake-{n}"
        usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        chunks = fake_chunks(cid, text.split(), usage=usage)
        headers = {"x-request-id": f"req-{n}", "openai-processing-ms": "7"}
        if not payload.get("stream"):
            return JSONResponse(
                {"id": cid, "object": "chat.completion", "choices": []}, headers=headers
            )

        hang = text.startswith("hang")  # stall after two chunks (client-disconnect tests)

        async def sse() -> AsyncIterator[bytes]:
            yield b": keep-alive\n\n"
            for n, chunk in enumerate(chunks):
                if hang and n == 2:
                    await asyncio.sleep(30)  # bounded; the test disconnects long before
                raw = f"data: {json.dumps(chunk)}\n\n".encode()
                # split every event across two network writes to exercise the decoder
                yield raw[: len(raw) // 2]
                await asyncio.sleep(0)
                yield raw[len(raw) // 2 :]
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.seen = seen
    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def running_server(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn inside the running loop; yields its base URL."""
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):  # bounded: 5 s
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        server.should_exit = True
        await task
        raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
