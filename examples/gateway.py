"""Example gateway: an OpenAI-compatible streaming proxy that publishes every chunk.

It forwards ``POST /v1/chat/completions`` to an upstream OpenAI-compatible API, streams the
answer back to its own client byte for byte, and publishes each chunk to chunkstitch.
The chunkstitch part is two lines (marked below): open a stream handle, tee the body.

Run it (embedded broker and topics first: ``chunkstitch broker`` / ``chunkstitch topics
create``)::

    CHUNKSTITCH_UPSTREAM_URL=https://api.openai.com/v1 \\
        uvicorn examples.gateway:create_app --factory --port 8080

Settings (environment): ``CHUNKSTITCH_UPSTREAM_URL`` (base URL including ``/v1``),
``CHUNKSTITCH_GATEWAY_PROVIDER`` (provider header, default ``openai``), plus every
``CHUNKSTITCH_*`` setting of the publisher (``CHUNKSTITCH_BROKER`` ...). The tenant is
taken from the client's ``X-Tenant`` header.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


class GatewaySettings(BaseSettings):
    """Settings of the example gateway (env prefix ``CHUNKSTITCH_``)."""

    model_config = SettingsConfigDict(env_prefix="CHUNKSTITCH_", extra="ignore")

    upstream_url: str = "https://api.openai.com/v1"
    gateway_provider: str = "openai"
    upstream_timeout_s: float = 300.0


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
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        url = gw.upstream_url.rstrip("/") + "/chat/completions"
        upstream = await client.send(
            client.build_request("POST", url, content=body, headers=headers), stream=True
        )
        media_type = upstream.headers.get("content-type", "application/json")
        if upstream.status_code != 200 or not media_type.startswith("text/event-stream"):
            # Errors and non-streaming answers pass through unchanged and are not published.
            content = await upstream.aread()
            await upstream.aclose()
            return Response(content, status_code=upstream.status_code, media_type=media_type)

        # --- chunkstitch: the two lines a gateway adds -----------------------------------
        stream = publisher.stream(
            tenant=request.headers.get("x-tenant"),
            provider=gw.gateway_provider,
            request_started_at=started,
        )
        body_iter = tee_sse(upstream, stream)
        # ----------------------------------------------------------------------------------

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for raw in body_iter:
                    yield raw
            finally:
                # client gone or upstream failed: end the tee now (its end marker says
                # aborted), not whenever the generator is garbage-collected
                await body_iter.aclose()
                await upstream.aclose()

        return StreamingResponse(relay(), media_type=media_type)

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

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/healthz", health),
        ],
        lifespan=lifespan,
    )
