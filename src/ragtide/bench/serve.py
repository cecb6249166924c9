"""`ragtide bench serve`: concurrent search and answer requests against the running stack, from this process.

Phases, each bounded in time and count and aimed at a loopback API only:
1. /v1/search with one client (latency), 2. /v1/search with N concurrent clients (QPS it holds),
3. streamed /v1/answer with one client (time to first token, tokens/s, total).
Latencies are measured client-side (what a caller sees), with the server's `took_ms` beside them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from ragtide.bench import save_result
from ragtide.contracts.errors import RagtideError
from ragtide.contracts.freshness import summarize, summarize_ms
from ragtide.contracts.net import is_loopback
from ragtide.contracts.settings import RagtideSettings, authorization

QUERIES = [
    "how do I catch an exception",
    "for loops over a sequence",
    "what does the with statement do",
    "string formatting with f-strings",
    "how are dictionaries ordered",
    "import a module from a package",
    "define a class with properties",
    "what is a generator expression",
    "integer division and remainders",
    "how does garbage collection work",
    "async functions and await",
    "unpack a tuple into variables",
]


def require_loopback(url: str) -> None:
    """Load goes to this machine only."""
    host = urlparse(url).hostname or ""
    if not is_loopback(host):
        raise ValueError(f"benchmarks target loopback addresses only, not {host!r}")


@dataclass
class Phase:
    """One phase's outcome."""

    name: str
    clients: int
    requests: int
    errors: int
    seconds: float
    qps: float
    latency_ms: dict[str, Any]
    server_ms: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def search_phase(
    api: str,
    headers: dict[str, str],
    clients: int,
    duration: float,
    max_requests: int,
    stop: threading.Event | None = None,
    name: str | None = None,
) -> Phase:
    """`clients` threads, each with its own keep-alive connection, searching until the time or count runs out (or
    `stop` is set)."""
    lock = threading.Lock()
    latencies: list[float] = []
    server: list[float] = []
    errors = [0]
    issued = [0]
    deadline = time.perf_counter() + duration

    def client(n: int) -> None:
        with httpx.Client(base_url=api, headers=headers, timeout=30) as http:
            i = n
            while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    # a distinct text per request: every search pays for its query embedding (no LRU hit)
                    query = f"{QUERIES[i % len(QUERIES)]} (request {i})"
                    resp = http.post("/v1/search", json={"query": query, "k": 5})
                    took = time.perf_counter() - t0
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    took, ok = time.perf_counter() - t0, False
                with lock:
                    if ok:
                        latencies.append(took)
                        server.append(resp.json()["took_ms"] / 1000)
                    else:
                        errors[0] += 1
                i += clients

    # warm-up: connections, the encoder's first call
    with httpx.Client(base_url=api, headers=headers, timeout=30) as http:
        for q in QUERIES[:3]:
            http.post("/v1/search", json={"query": q, "k": 5})
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return Phase(
        name or f"search ×{clients}",
        clients,
        len(latencies),
        errors[0],
        round(elapsed, 2),
        round(len(latencies) / elapsed, 1),
        summarize_ms(latencies),
        summarize_ms(server),
    )


def answer_phase(api: str, headers: dict[str, str], count: int, max_tokens: int, timeout: float) -> Phase:
    """Streamed answers one after another: TTFT, total, completion tokens/s."""
    ttft: list[float] = []
    total: list[float] = []
    rates: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    deadline = t0 + timeout
    with httpx.Client(base_url=api, headers=headers, timeout=120) as http:
        for i in range(count):
            if time.perf_counter() > deadline:
                break
            body = {
                "query": QUERIES[i % len(QUERIES)],
                "k": 3,
                "stream": True,
                "max_tokens": max_tokens,
                "cache": False,
            }
            start = time.perf_counter()
            first: float | None = None
            done: dict[str, Any] | None = None
            event = None
            with http.stream("POST", "/v1/answer", json=body) as resp:
                if resp.status_code != 200:
                    errors += 1
                    continue
                for line in resp.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        if event == "token" and first is None:
                            first = time.perf_counter() - start
                        elif event == "done":
                            done = json.loads(line[6:])
            end = time.perf_counter() - start
            if first is None or done is None:
                errors += 1
                continue
            ttft.append(first)
            total.append(end)
            tokens = done["usage"]["completion_tokens"]
            if tokens > 1 and end > first:
                rates.append((tokens - 1) / (end - first))
    elapsed = time.perf_counter() - t0
    return Phase(
        "answer (stream) ×1",
        1,
        len(total),
        errors,
        round(elapsed, 2),
        round(len(total) / elapsed, 2) if elapsed else 0.0,
        summarize_ms(total),
        extra={"ttft_ms": summarize_ms(ttft), "tokens_per_s": summarize(rates), "max_tokens": max_tokens},
    )


@dataclass
class ServeResult:
    """The whole run."""

    api: str
    indexed_chunks: int
    phases: list[Phase]
    started: str
    machine: dict[str, Any] = field(default_factory=dict)
    load: dict[str, dict[str, Any]] = field(default_factory=dict)  # contender -> wrk levels (ragtide.bench.load)
    limits: dict[str, Any] = field(default_factory=dict)

    def save(self, out: Path) -> Path:
        """bench/results/serve-<time>.json"""
        return save_result(asdict(self), out, "serve", self.started)


def search_during_backfill(dsn: str, api: str, headers: dict[str, str], target_points: int, timeout: float) -> Phase:
    """One client searching while the index grows to `target_points` through the pipeline (a backfill: the
    embedder busy with full batches). The phase's extra says how many points the backfill added."""
    before = indexed_chunks(api, headers)
    stop = threading.Event()
    box: dict[str, Any] = {}

    def grow() -> None:
        try:
            box["points"] = grow_index(dsn, api, target_points, timeout)
        except Exception as exc:  # reported with the phase
            box["error"] = repr(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=grow, name="backfill", daemon=True)
    thread.start()
    phase = search_phase(api, headers, 1, timeout, 10_000_000, stop=stop, name="search ×1 during backfill")
    thread.join()
    phase.extra = {"points_before": before, "points_after": box.get("points"), "error": box.get("error")}
    return phase


def indexed_chunks(api: str, headers: dict[str, str]) -> int:
    """Points in the live generation (what search runs over)."""
    stats = httpx.get(f"{api}/v1/index/stats", headers=headers, timeout=30).json()
    return int(stats["points"])


def grow_index(dsn: str, api: str, target_points: int, timeout: float, progress: Any = None, batch: int = 5000) -> int:
    """Insert synthetic one-chunk rows (category 'bench', ids `bench-serve/<n>`) into public.docs until the
    index holds `target_points`, through the real pipeline; wait until they are indexed. Returns the points."""
    import random

    import psycopg

    from ragtide.bench.workload import VOCAB

    def short(rng: random.Random) -> str:  # one small chunk each: search cost depends on the count, not length
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(8, 16)))

    have = indexed_chunks(api, {})
    missing = max(0, target_points - have)
    rng = random.Random(11)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM public.docs WHERE id LIKE 'bench-serve/%'").fetchone()
        start = int(row[0]) if row else 0
        for first in range(0, missing, batch):
            rows = [
                (f"bench-serve/{start + first + i}", "bench", short(rng), "bench-serve")
                for i in range(min(batch, missing - first))
            ]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, %s, %s, %s, 'bench')"
                    " ON CONFLICT (id) DO NOTHING",
                    rows,
                )
            conn.commit()
    deadline = time.monotonic() + timeout
    while (points := indexed_chunks(api, {})) < target_points:
        if progress is not None:
            progress(points)
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {points} of {target_points} points indexed after {timeout:.0f}s")
        time.sleep(2)
    return points


@dataclass
class ServePlan:
    """What one `ragtide bench serve` measures (its options)."""

    duration_s: float = 10.0  # per search phase
    clients: int = 8  # of the second search phase
    answers: int = 5  # streamed answers (0: none)
    max_tokens: int = 32
    key: str | None = None  # None: no key (dev mode)
    grow_to: int | None = None  # first grow the index to this many chunks
    backfill_to: int | None = None  # search with 1 client while a backfill grows the index to this many
    level_s: float = 15.0  # per wrk level
    baseline: str | None = None  # also the node of this git revision, side by side
    rounds: int = 1  # wrk's levels per contender, in turn, each on a freshly started node; the best counts
    load: bool = True  # the wrk levels
    connections: list[int] = field(default_factory=lambda: [64, 256, 1024])
    sweep: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])


def run(
    settings: RagtideSettings, api: str, plan: ServePlan, status: Callable[[str], None] = lambda _: None
) -> ServeResult:
    """The whole benchmark against the running API at `api` (loopback): grow or backfill first if asked (then build
    the HNSW graph), search with 1 and N clients, streamed answers, then wrk's levels for this code and the
    baseline's node, and a limited key's 429s."""
    from ragtide.bench import load as wrk
    from ragtide.contracts.machine import cpu_info

    dsn, headers = settings.postgres.dsn(), authorization(plan.key)
    if plan.grow_to:
        status(f"growing the index to {plan.grow_to} chunks through the pipeline…")
        grow_index(dsn, api, plan.grow_to, timeout=3600, progress=lambda n: status(f"{n} chunks"))
    phases = []
    if plan.backfill_to:
        status(f"searching while a backfill grows the index to {plan.backfill_to} chunks…")
        phases.append(search_during_backfill(dsn, api, headers, plan.backfill_to, timeout=3600))
    if plan.backfill_to or plan.grow_to:
        status("building the index's HNSW graph (ragtide optimize)…")
        admin = settings.gateway.admin_headers()
        resp = httpx.post(f"{api}/v1/admin/optimize", json={}, headers=admin, timeout=3600)
        if resp.status_code != 200:
            raise RagtideError(f"optimize answered {resp.status_code}: {resp.text}")
    for n in (1, plan.clients):
        status(f"/v1/search with {n} client(s) for {plan.duration_s:g}s…")
        phases.append(search_phase(api, headers, n, plan.duration_s, max_requests=200_000))
    if plan.answers:
        status(f"{plan.answers} streamed answers…")
        phases.append(answer_phase(api, headers, plan.answers, plan.max_tokens, timeout=300))
    result = ServeResult(api, indexed_chunks(api, headers), phases, time.strftime("%Y%m%d-%H%M%S"))
    result.machine = cpu_info()
    if plan.load:
        levels, swept = plan.connections, plan.sweep
        repo = wrk.git_toplevel() if plan.baseline else Path.cwd()
        with wrk.contenders(settings, plan.baseline, repo, plan.rounds) as nodes:
            result.load = wrk.alternate(
                plan.rounds, nodes, lambda: wrk.measure(api, levels, swept, plan.level_s, plan.key), status
            )
        status("limits still apply: a key of 10 requests/s under 16 connections…")
        result.limits = wrk.limits_apply(settings, api)
    return result
