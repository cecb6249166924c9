"""Load levels with wrk (Debian's HTTP load generator): many connections on /v1/search, each request with a query
text of its own (a Lua script), answers counted by status; and a sweep for the highest QPS at p99 ≤ 200 ms.

wrk keeps every connection busy (a closed loop): `connections` is the number of users waiting at once. Its
latencies cover every answer, a fast 503 included; the 503s are counted apart (`shed`), as are timeouts and socket
errors. Only loopback addresses are driven, for a bounded time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ragtide.bench.serve import QUERIES, require_loopback
from ragtide.contracts.settings import RagtideSettings

P99_GOAL_MS = 200.0

_SCRIPT = r"""
-- ragtide bench serve: POST /v1/search, each request with its own query text (tagged with this level's run, so no
-- text repeats across levels: a repeat would skip the model through the query-vector cache); counted by status.
local queries = {%(queries)s}
local run = %(run)s
local auth = %(auth)s
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  n200, n503, n429, nother, counter = 0, 0, 0, 0, 0
end

function request()
  counter = counter + 1
  local q = queries[(counter %% #queries) + 1] .. " (request " .. run .. "-" .. id .. "-" .. counter .. ")"
  local headers = {["Content-Type"] = "application/json"}
  if auth ~= "" then headers["Authorization"] = auth end
  return wrk.format("POST", "%(path)s", headers, '{"query": "' .. q .. '", "k": 5}')
end

function response(status, headers, body)
  if status == 200 then n200 = n200 + 1 elseif status == 503 then n503 = n503 + 1
  elseif status == 429 then n429 = n429 + 1 else nother = nother + 1 end
end

function done(summary, latency, requests)
  local ok, shed, limited, other = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    ok = ok + t:get("n200"); shed = shed + t:get("n503"); limited = limited + t:get("n429")
    other = other + t:get("nother")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"ok": %%d, "shed": %%d, "limited": %%d, "other": %%d, "duration_us": %%d, "timeouts": %%d, ' ..
    '"connect_errors": %%d, "read_errors": %%d, "write_errors": %%d, ' ..
    '"p50_us": %%d, "p95_us": %%d, "p99_us": %%d, "max_us": %%d}\n',
    ok, shed, limited, other, summary.duration, e.timeout, e.connect, e.read, e.write,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


@dataclass
class Level:
    """One load level's outcome."""

    connections: int
    seconds: float
    ok: int
    shed: int  # 503 with Retry-After: turned away by admission control
    limited: int  # 429: a key's rate limit or quota
    other: int  # any other non-200 status
    timeouts: int
    socket_errors: int  # connect, read and write errors (a refused or reset connection)
    qps: float  # 200s per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def clean(self) -> bool:
        """No timeouts, no socket errors, nothing but 200, 503 and 429."""
        return not (self.timeouts or self.socket_errors or self.other)


def script(auth: str | None, path: str = "/v1/search") -> str:
    """The Lua script: distinct queries (a fresh run tag per call, so no text repeats across levels), the optional
    Authorization header."""
    queries = ", ".join(json.dumps(q) for q in QUERIES)
    tag = json.dumps(uuid.uuid4().hex[:8])
    return _SCRIPT % {
        "queries": queries,
        "auth": json.dumps(f"Bearer {auth}" if auth else ""),
        "path": path,
        "run": tag,
    }


def wrk_path() -> str:
    """wrk's path, or an error that says how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: run infra/scripts/system-deps.sh (apt-get install wrk)")
    return path


def run_level(
    api: str, connections: int, seconds: float, key: str | None = None, timeout_s: float = 5.0, threads: int = 2
) -> Level:
    """`connections` connections on /v1/search for `seconds` (wrk's own timeout: `timeout_s`)."""
    require_loopback(api)
    host = urlparse(api)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script(key))
    try:
        proc = subprocess.run(
            [
                wrk_path(),
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{seconds:g}s",
                f"--timeout={timeout_s:g}s",
                "-s",
                f.name,
                f"{host.scheme}://{host.netloc}/v1/search",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + timeout_s + 60,
            check=False,
        )
    finally:
        Path(f.name).unlink(missing_ok=True)
    return parse(proc.stdout + proc.stderr, connections)


def parse(output: str, connections: int) -> Level:
    """The RESULT line the script's done() prints."""
    line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")
    r = json.loads(line.removeprefix("RESULT "))
    seconds = r["duration_us"] / 1e6
    return Level(
        connections=connections,
        seconds=round(seconds, 2),
        ok=r["ok"],
        shed=r["shed"],
        limited=r["limited"],
        other=r["other"],
        timeouts=r["timeouts"],
        socket_errors=r["connect_errors"] + r["read_errors"] + r["write_errors"],
        qps=round(r["ok"] / seconds, 1) if seconds else 0.0,
        p50_ms=round(r["p50_us"] / 1000, 1),
        p95_ms=round(r["p95_us"] / 1000, 1),
        p99_ms=round(r["p99_us"] / 1000, 1),
        max_ms=round(r["max_us"] / 1000, 1),
    )


def best_qps_within(levels: list[Level], p99_ms: float = P99_GOAL_MS) -> float:
    """The highest QPS among the levels whose p99 is within `p99_ms` with every request answered 200: a level that
    sheds does not count (its fast 503s would flatter the percentile). 0.0 if none."""
    return max(
        (lv.qps for lv in levels if lv.clean and not lv.shed and not lv.limited and lv.p99_ms <= p99_ms), default=0.0
    )


def as_dicts(levels: list[Level]) -> list[dict[str, object]]:
    """For the JSON result."""
    return [asdict(lv) for lv in levels]


def levels(api: str, connections: list[int], seconds: float, key: str | None, pause_s: float = 3.0) -> list[Level]:
    """One level per connection count, a pause between them (the server drains what the last one left)."""
    import time

    out = []
    for i, n in enumerate(connections):
        if i:
            time.sleep(pause_s)
        out.append(run_level(api, n, seconds, key))
    return out


Contender = tuple[str, Callable[[], None]]  # (its name, start(): the node runs its code, freshly started)


def same_precision(settings: RagtideSettings) -> RagtideSettings:
    """`settings` with the live index's precision pinned where auto runs an int8 index: a baseline from before auto
    picked int8 (or kept an index's precision) would rebuild it as float at every turn, and this node back."""
    from ragtide.bench.freshness import live_generation

    live = live_generation(settings)
    if settings.encoder.dtype != "auto" or live is None or live["live"]["precision"] != "int8":
        return settings
    return settings.model_copy(update={"encoder": settings.encoder.model_copy(update={"dtype": "int8"})})


@contextlib.contextmanager
def contenders(
    settings: RagtideSettings, baseline: str | None, repo: Path, rounds: int = 1
) -> Iterator[list[Contender]]:
    """This checkout's node and, with `baseline`, the node of that git revision (a worktree of `repo`) over the same
    data, each with a `start` that (re)starts the node with its code; this checkout's node runs again afterwards.
    One round of this checkout alone measures the node as it runs (however it was started)."""
    from ragtide.stack.stack import Stack

    if baseline is None and rounds == 1:
        yield [("this", lambda: None)]
        return
    if baseline is not None:
        settings = same_precision(settings)
    stack = Stack(settings)

    def starter(code: Path | None) -> Callable[[], None]:
        def start() -> None:
            stack.daemon("node").stop(timeout=60)
            stack.start_node(code=code)
            stack.wait_ready()

        return start

    if baseline is None:
        yield [("this", starter(None))]
        return
    short = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", baseline], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"ragtide-baseline-{short}-"))
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), baseline], capture_output=True, check=True
    )
    try:
        yield [("this", starter(None)), (f"baseline {short}", starter(tree / "src"))]
    finally:
        try:
            stack.daemon("node").stop(timeout=60)  # the baseline's node imports from the worktree until it stops
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
            starter(None)()


def alternate(
    rounds: int, nodes: list[Contender], measure: Callable[[], dict[str, Any]], status: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Each contender measured `rounds` times, in turn (this, baseline, this, baseline…), each time on a freshly
    started node, so neither gets the quieter minutes of the machine (after a backfill Postgres vacuums and
    checkpoints for a while) or a warmer process. Per contender: its best round (by the highest QPS at p99 ≤ 200
    ms, as benchmarks take the best of repeats against noise), with every round's figure beside it."""
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in nodes}
    for r in range(rounds):
        for name, start in nodes:
            status(f"round {r + 1} of {rounds}: {name}: starting its node, then wrk…")
            start()
            measured[name].append(measure())
    out = {}
    for name, runs in measured.items():
        best = max(range(len(runs)), key=lambda i: runs[i]["best_qps_p99_200ms"])
        out[name] = {**runs[best], "round": best + 1, "rounds_best_qps": [m["best_qps_p99_200ms"] for m in runs]}
    return out


def measure(api: str, connections: list[int], sweep: list[int], seconds: float, key: str | None) -> dict[str, Any]:
    """One contender: a sweep of small levels before any overload (the highest QPS at p99 ≤ 200 ms comes from it and
    the load levels), then the load levels, then one connection right after the largest (recovery from overload)."""
    measured = levels(api, [*sweep, *connections], seconds, key)
    swept, main = measured[: len(sweep)], measured[len(sweep) :]
    after = levels(api, [1], seconds, key)  # no pause: what a new client gets the moment the overload ends
    return {
        "sweep": as_dicts(swept),
        "levels": as_dicts(main),
        "after_overload": as_dicts(after),
        "best_qps_p99_200ms": best_qps_within(main + swept),
    }


def limits_apply(settings: RagtideSettings, api: str, rate: float = 10.0, seconds: float = 5.0) -> dict[str, Any]:
    """The gateway's per-key limits still hold under load: a tenant key limited to `rate` requests/s, driven by 16
    connections; most of its requests must be 429s. The key is revoked afterwards."""
    from ragtide.gateway.store import PostgresGatewayStore, new_key

    store = PostgresGatewayStore(settings.postgres.state())
    key, record = new_key("bench-limits", "bench serve: limits apply", rate, int(rate))
    store.add_key(record)
    try:
        level = run_level(api, 16, seconds, key=key)
    finally:
        store.revoke_key(record.id)
        store.close()
    return {"rate_per_s": rate, **asdict(level)}


def git_toplevel() -> Path:
    """The checkout this command runs in (for a baseline's worktree)."""
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError("--baseline needs a git checkout of ragtide as the working directory")
    return Path(out.stdout.strip())
