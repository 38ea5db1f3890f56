"""Example gateway: an OpenAI-compatible streaming proxy that publishes every chunk.

It forwards ``POST /v1/chat/completions`` to an upstream OpenAI-compatible API, streams the
answer back to its own client byte for byte, and publishes each chunk to chunkstitch.
The chunkstitch part is two lines (marked below): open a stream handle, tee the body.

Run it (embedded broker and topics first: ``chunkstitch broker`` / ``chunkstitch topics
create``)::

    CHUNKSTITCH_UPSTREAM_URL=https://api.openai.com/v1 \\
        uvicorn examples.gateway:create_app --factory --port 8080

Settings (environment): ``CHUNKSTITCH_UPSTREAM_URL`` (base URL including ``/v1``),
``CHUNKSTITCH_GATEWAY_PROVIDER`` (provider header, default ``openai``),
``CHUNKSTITCH_GATEWAY_ASK_USAGE`` (default true, see below), plus every
``CHUNKSTITCH_*`` setting of the publisher (``CHUNKSTITCH_BROKER`` ...). The tenant is
taken from the client's ``X-Tenant`` header.

What else it does, as a real gateway should:

* the upstream's response headers reach the client (``x-request-id``, rate limits,
  ``openai-processing-ms`` ...), except hop-by-hop ones and those that describe the
  body's transfer (length, encoding: httpx hands over the decoded body);
* a streaming request that does not say ``stream_options.include_usage`` is sent
  upstream with ``include_usage: true``, so that its tokens are counted; the extra
  usage-only chunk the upstream then sends is published but not forwarded to the client,
  who did not ask for it (a client that sets ``include_usage`` itself gets exactly what
  it asked for). OpenAI also adds ``"usage": null`` to the other chunks in that mode;
  those bytes are forwarded unchanged;
* ``GET /metrics``: Prometheus metrics of the process, among them the publisher's
  ``chunkstitch_publisher_failed_total{reason}``; ``GET /healthz``: the publisher's counts.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from processor.clients import Publisher, tee_sse
from processor.settings import Settings

__all__ = ["GatewaySettings", "create_app"]

_FORWARDED = ("authorization", "content-type", "openai-organization", "openai-project")
# Response headers never passed back: hop-by-hop (RFC 9110 7.6.1) and those describing
# the upstream's transfer of the body, which the gateway re-encodes (httpx decodes it).
_NOT_RETURNED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "content-type",
        "date",
        "server",
    }
)


def _response_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_RETURNED}


def _ask_for_usage(body: bytes) -> tuple[bytes, bool]:
    """``(body to send upstream, strip the usage-only chunk from the client's stream)``.

    A streaming request that does not set ``stream_options.include_usage`` gets
    ``include_usage: true``; anything else (not JSON, not streaming, set by the client)
    is sent unchanged.
    """
    try:
        request: Any = json.loads(body)
    except ValueError:
        return body, False
    if not isinstance(request, dict) or request.get("stream") is not True:
        return body, False
    options = request.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or "include_usage" in options:
        return body, False
    request["stream_options"] = {**options, "include_usage": True}
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode(), True


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # an SSE event ends with a blank line


def _is_usage_only(event: bytes) -> bool:
    """An SSE event whose data is a chunk with no choices and a usage object."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if not payload.startswith(b"{"):
                return False
            try:
                chunk = json.loads(payload)
            except ValueError:
                return False
            return (
                isinstance(chunk, dict)
                and not chunk.get("choices")
                and chunk.get("usage") is not None
            )
    return False


async def _without_usage_chunk(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The SSE byte stream minus its usage-only events; every other byte unchanged."""
    pending = b""
    async for piece in source:
        pending += piece
        out = b""
        while (match := _EVENT_END.search(pending)) is not None:
            event, pending = pending[: match.end()], pending[match.end() :]
            if not _is_usage_only(event.replace(b"\r", b"")):
                out += event
        if out:
            yield out
    if pending and not _is_usage_only(pending.replace(b"\r", b"")):
        yield pending


class GatewaySettings(BaseSettings):
    """Settings of the example gateway (env prefix ``CHUNKSTITCH_``)."""

    model_config = SettingsConfigDict(env_prefix="CHUNKSTITCH_", extra="ignore")

    upstream_url: str = "https://api.openai.com/v1"
    gateway_provider: str = "openai"
    upstream_timeout_s: float = 300.0
    gateway_ask_usage: bool = True


def create_app(
    gateway: GatewaySettings | None = None, settings: Settings | None = None
) -> Starlette:
    """Build the gateway app (the publisher starts and stops with the app)."""
    gw = gateway or GatewaySettings()
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with (
            Publisher(settings) as publisher,
            httpx.AsyncClient(timeout=gw.upstream_timeout_s) as client,
        ):
            state["publisher"], state["client"] = publisher, client
            yield

    async def chat_completions(request: Request) -> Response:
        publisher: Publisher = state["publisher"]  # type: ignore[assignment]
        client: httpx.AsyncClient = state["client"]  # type: ignore[assignment]
        started = time.time()
        body = await request.body()
        strip_usage = False
        if gw.gateway_ask_usage:
            body, strip_usage = _ask_for_usage(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        url = gw.upstream_url.rstrip("/") + "/chat/completions"
        upstream = await client.send(
            client.build_request("POST", url, content=body, headers=headers), stream=True
        )
        media_type = upstream.headers.get("content-type", "application/json")
        returned = _response_headers(upstream)
        if upstream.status_code != 200 or not media_type.startswith("text/event-stream"):
            # Errors and non-streaming answers pass through unchanged and are not published.
            content = await upstream.aread()
            await upstream.aclose()
            return Response(
                content,
                status_code=upstream.status_code,
                media_type=media_type,
                headers=returned,
            )

        # --- chunkstitch: the two lines a gateway adds -----------------------------------
        stream = publisher.stream(
            tenant=request.headers.get("x-tenant"),
            provider=gw.gateway_provider,
            request_started_at=started,
        )
        body_iter = tee_sse(upstream, stream)
        # ----------------------------------------------------------------------------------

        to_client = _without_usage_chunk(body_iter) if strip_usage else body_iter

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for raw in to_client:
                    yield raw
            finally:
                # client gone or upstream failed: end the tee now (its end marker says
                # aborted), not whenever the generator is garbage-collected
                await body_iter.aclose()
                await upstream.aclose()

        return StreamingResponse(relay(), media_type=media_type, headers=returned)

    async def health(_: Request) -> Response:
        publisher = state.get("publisher")
        stats = publisher.stats if isinstance(publisher, Publisher) else None
        return JSONResponse(
            {
                "ok": stats is not None,
                "chunks": stats.chunks if stats else 0,
                "failed": stats.failed if stats else 0,
            }
        )

    async def metrics(_: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/healthz", health),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
