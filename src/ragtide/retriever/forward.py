"""The admin endpoints of a standalone retriever: forwarded to the embedder that leads, where the writes happen
(verify and its repair, reindex, the blue/green status, clearing the answer cache). Any retriever behind a load
balancer answers them the same, so the CLI and the README's curl work unchanged under compose and Kubernetes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from ragtide.retriever.services import get_admin

FORWARDED_HEADERS = ("authorization", "x-api-key", "content-type")


def admin_proxy(leader: Callable[[], str | None], timeout_s: float = 3600.0) -> APIRouter:
    """`/v1/admin/*`, checked here (the admin key) and again by the leader, answered by the leader."""
    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(get_admin)])
    clients: list[httpx.AsyncClient] = []

    @router.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        """Forwarded to the leading embedder (see its endpoints: verify, reindex, generations, optimize, cache)."""
        if ".." in path.split("/"):
            raise HTTPException(404, "no such admin endpoint")
        url = await asyncio.to_thread(leader)
        if url is None:
            raise HTTPException(
                503,
                "no embedder leads right now: is one running? (a new leader takes over within index.lease_renew_s "
                "of the old one's end)",
                headers={"Retry-After": "2"},
            )
        if not clients:
            clients.append(httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0)))
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        try:
            resp = await clients[0].request(
                request.method,
                f"{url}/v1/admin/{path}",
                content=await request.body(),
                headers=headers,
                params=request.query_params,
            )
        except httpx.HTTPError as exc:
            raise HTTPException(
                503, f"the leading embedder at {url} did not answer ({exc!r})", headers={"Retry-After": "2"}
            ) from exc
        if resp.status_code == 409:  # the lease moved between our read and its answer: ask again shortly
            raise HTTPException(503, f"the embedder at {url} no longer leads; retry", headers={"Retry-After": "2"})
        kept = {k: v for k, v in resp.headers.items() if k.lower() == "retry-after"}
        return Response(resp.content, resp.status_code, headers=kept, media_type=resp.headers.get("content-type"))

    return router
