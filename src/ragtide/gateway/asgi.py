"""The gateway's HTTP edge as plain ASGI (no per-request task or stream, unlike BaseHTTPMiddleware): refuse an
oversized body before reading it, and put the rate and quota headers that the request's admission produced on
its response (the quota as it stands after the request was charged)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ragtide.gateway.gateway import Caller, Gateway

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# request.state is scope["state"]: the routes' dependencies leave these there
HEADERS_KEY = "gateway_headers"
CALLER_KEY = "caller"


class GatewayEdge:
    """ASGI middleware around the whole app."""

    def __init__(self, app: ASGIApp, gateway: Gateway, max_body_bytes: int) -> None:
        self.app = app
        self.gateway = gateway
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._refuse(send, 413, f"request body: larger than {self.max_body_bytes} bytes")
            return
        state = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(state.get(HEADERS_KEY) or {})
                caller: Caller | None = state.get(CALLER_KEY)
                if caller is not None and "X-Quota-Limit" in headers:  # a stream is charged at its end
                    headers.update(await asyncio.to_thread(self.gateway.quota_headers, caller))
                if headers:
                    raw = [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]
                    message["headers"] = [*message.get("headers", []), *raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
