"""`ragtide bench freshness`: drive a steady write load from a separate process and measure commit -> searchable.

Per change: the embedder's stage timestamps (source commit, Debezium emit, Kafka, dequeue, embedded, store ack)
read back from /v1/freshness/changes. Throughout: the canary (commit -> returned by a real search).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ragtide.bench.workload import Workload, run_workload, seed_rows
from ragtide.contracts.errors import StackError
from ragtide.contracts.freshness import STAGES, percentile, summarize
from ragtide.contracts.settings import EncoderSettings, RagtideSettings

log = logging.getLogger(__name__)

FIND_MAX_STEPS = (10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 70.0, 100.0, 150.0, 200.0, 300.0, 400.0)
TARGETS = {5.0: (0.3, 0.8), 50.0: (0.5, 1.5)}  # rate -> (p50, p99) seconds on a 2-core machine


@dataclass
class RateResult:
    """The outcome of one rate."""

    rate: float
    duration_s: float
    written: int
    achieved_per_s: float
    end_to_end: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    canary: dict[str, Any]
    sustained: bool
    first_p50: float | None
    last_p50: float | None
    node: str = ""  # the node's configuration it ran against (`--dtype`), when the run compares several
    series: list[tuple[int, float]] = field(default_factory=list)  # (commit ms, seconds)
    canary_series: list[tuple[int, float]] = field(default_factory=list)

    def meets_target(self) -> bool:
        """p50 and p99 within the target for this rate (`TARGETS`); False for a rate without one."""
        target = TARGETS.get(self.rate)
        e = self.end_to_end
        return target is not None and (e["p50"] or 99) <= target[0] and (e["p99"] or 99) <= target[1]

    def as_dict(self) -> dict[str, Any]:
        """JSON form (without the raw series)."""
        d = {k: v for k, v in self.__dict__.items() if k not in {"series", "canary_series"}}
        d["samples"] = len(self.series)
        return d


def _wait_applied(api: str, rows: set[str], since_ms: int, timeout: float) -> None:
    """Wait until every row in `rows` shows up among the changes applied since `since_ms`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{api}/v1/freshness/changes", params={"since_ms": since_ms}, timeout=60).json()
        if rows <= {c["row_id"] for c in body["changes"]}:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{len(rows)} seed rows not indexed within {timeout:.0f}s")


def run_rate(
    settings: RagtideSettings,
    rate: float,
    duration_s: float,
    mix: dict[str, int],
    seed_n: int = 200,
    drain_s: float = 60.0,
) -> RateResult:
    """One steady-rate run: seed, write from a child process, drain, read the timings back."""
    api = settings.api.url
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    seeded_at = int(time.time() * 1000) - 1000
    seeds = seed_rows(settings.postgres.dsn(), prefix, seed_n)
    _wait_applied(api, set(seeds), seeded_at, timeout=300)
    time.sleep(1.0)
    log = Path(settings.data_dir) / "bench" / f"{prefix}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    start_ms = int(time.time() * 1000)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=run_workload, args=(Workload(settings.postgres.dsn(), prefix, rate, duration_s, mix, seeds, log),)
    )
    proc.start()
    proc.join(duration_s + 120)
    if proc.is_alive():
        proc.terminate()
        raise RuntimeError("the workload process did not finish")
    end_ms = int(time.time() * 1000)
    sent = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    touched = {s["row"] for s in sent}

    deadline = time.monotonic() + drain_s
    changes: list[dict[str, Any]] = []
    canary: list[list[float]] = []
    while True:
        body = httpx.get(f"{api}/v1/freshness/changes", params={"since_ms": start_ms}, timeout=60).json()
        changes = [c for c in body["changes"] if c["table"] == "public.docs" and c["row_id"] in touched]
        canary = body["canary"]
        # Coalescing can fold several changes of one row into one applied change, so wait for the last per row.
        last_sent = {s["row"]: s["sent_ms"] for s in sent}
        newest_applied: dict[str, int] = {}
        for c in changes:
            newest_applied[c["row_id"]] = max(newest_applied.get(c["row_id"], 0), c["source_ms"])
        pending = [r for r, ms in last_sent.items() if newest_applied.get(r, 0) < ms - 1000]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    e2e = [c["end_to_end_s"] for c in changes]
    ordered = sorted(changes, key=lambda c: c["source_ms"])
    fifth = max(1, len(ordered) // 5)
    first = percentile([c["end_to_end_s"] for c in ordered[:fifth]], 50)
    last = percentile([c["end_to_end_s"] for c in ordered[-fifth:]], 50)
    # Not sustained: latency at the end of the run is far above the start (lag grows), or changes never landed.
    sustained = bool(changes) and not pending and (last or 0) <= max(1.0, 2.5 * (first or 0))
    canary_run = [s for t, s in canary if start_ms <= t <= end_ms + 5_000]
    return RateResult(
        rate=rate,
        duration_s=duration_s,
        written=len(sent),
        achieved_per_s=round(len(sent) / max(0.001, (end_ms - start_ms) / 1000), 2),
        end_to_end=summarize(e2e),
        stages={s: summarize([c["stages"][s] for c in changes]) for s in STAGES},
        canary=summarize(canary_run),
        sustained=sustained,
        first_p50=first,
        last_p50=last,
        series=[(c["source_ms"], c["end_to_end_s"]) for c in ordered],
        canary_series=[(int(t), float(s)) for t, s in canary if start_ms <= t <= end_ms + 5_000],
    )


def live_generation(settings: RagtideSettings) -> dict[str, Any] | None:
    """The node's generations (live, building) as its admin API reports them; None while it does not answer. A
    refusal (prod mode without the admin key) is an error at once, not a wait."""
    url = f"{settings.api.url}/v1/admin/generations"
    try:
        resp = httpx.get(url, headers=settings.gateway.admin_headers(), timeout=10)
    except httpx.HTTPError:
        return None
    if resp.status_code in (401, 403):
        raise StackError(f"{url} refused the admin request ({resp.status_code}): set RAGTIDE_GATEWAY__ADMIN_KEY")
    if resp.status_code != 200:
        return None
    out: dict[str, Any] = resp.json()
    return out


@contextmanager
def node_with_dtype(settings: RagtideSettings, dtype: str, timeout: float = 1800.0) -> Iterator[RagtideSettings]:
    """While inside: the node runs with `encoder.dtype` = `dtype`, its index in that precision (a change of
    precision rebuilds it blue/green: this waits until the rebuilt generation is live); afterwards the node as
    configured again (a rebuild back, if a precision is set, goes on in the background; auto keeps this one).
    Not while `up --supervise` runs: its supervisor would start the node as configured in between."""
    want = "int8" if dtype == "int8" else "float"
    encoder = settings.encoder.model_copy(update={"dtype": dtype})
    with node_with_encoder(settings, encoder, lambda live: live["precision"] == want, f"the index in {want}", timeout):
        yield settings.model_copy(update={"encoder": encoder})


@contextmanager
def node_with_encoder(
    settings: RagtideSettings,
    encoder: EncoderSettings,
    wanted: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 1800.0,
    meanwhile: Callable[[], None] = lambda: None,
) -> Iterator[RagtideSettings]:
    """While inside: the node runs with `encoder`, and the generation it rebuilt blue/green (`wanted` of the live
    spec says when) is live; `meanwhile` runs once a second until then. Afterwards the node as configured again (a
    rebuild back, if any, goes on in the background)."""
    from ragtide.stack.stack import Stack

    s = settings.model_copy(update={"encoder": encoder})
    stack = Stack(s)
    node = stack.daemon("node")
    node.stop(timeout=60)
    failed = False
    try:
        stack.start_node()
        deadline = time.monotonic() + timeout
        while True:
            gens = live_generation(s)
            if gens is not None and wanted(gens["live"]) and gens["building"] is None:
                break
            if node.pid() is None:
                raise StackError(f"the node exited while rebuilding its index for {what}; log {node.log_file}")
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {timeout:.0f}s waiting for {what} to be live")
            meanwhile()
            time.sleep(1.0)
        stack.wait_ready()
        yield s
    except BaseException:
        failed = True
        raise
    finally:
        try:
            node.stop(timeout=60)
            Stack(settings).start_node()
            Stack(settings).wait_ready()
        except Exception as exc:
            if not failed:
                raise
            log.error("restarting the node as configured failed too", extra={"error": repr(exc)})


def plot(results: list[RateResult], path: Path) -> Path | None:
    """Latency over time per rate (PNG); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        if r.series:
            t0 = r.series[0][0]
            ax.scatter([(t - t0) / 1000 for t, _ in r.series], [s for _, s in r.series], s=6, label="per change")
            if r.canary_series:
                ax.plot(
                    [(t - t0) / 1000 for t, _ in r.canary_series], [s for _, s in r.canary_series], "g-", label="canary"
                )
        e = r.end_to_end
        node = f"{r.node}, " if r.node else ""
        ax.set_title(f"{node}{r.rate:g} changes/s: p50 {e['p50']} s, p99 {e['p99']} s")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("commit -> searchable (s)")
        ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sweep(
    settings: RagtideSettings,
    rates: list[float],
    duration: float,
    weights: dict[str, int],
    dtypes: list[str],
    find_max: bool,
    status: Callable[[str], None] = lambda _: None,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[list[RateResult], float | None]:
    """Every rate, once per precision in `dtypes` (the node restarted in it; none: as configured); with `find_max`,
    then step up from the best sustained rate, staying below the lowest one that already failed. Returns the
    results (by rate with `find_max`) and the largest sustained rate tried (with `find_max`). `status`: what runs
    now (transient); `say`: what stays on the screen."""
    results: list[RateResult] = []
    for node in dtypes or [""]:
        if node:
            say(f"restarting the node with encoder.dtype={node} (its index rebuilt in it if need be)…")
        with node_with_dtype(settings, node) if node else nullcontext(settings) as ns:
            for per_s in rates:
                status(f"{node + ': ' if node else ''}{per_s:g} changes/s for {duration:g}s…")
                res = run_rate(ns, per_s, duration, weights)
                res.node = node
                results.append(res)
    if not find_max:
        return results, None
    ok = max((r.rate for r in results if r.sustained), default=0.0)
    failed = min((r.rate for r in results if not r.sustained), default=float("inf"))
    for step in [c for c in FIND_MAX_STEPS if ok < c < failed]:
        status(f"looking for the sustained maximum: {step:g} changes/s…")
        res = run_rate(settings, step, min(duration, 20.0), weights)
        results.append(res)
        if not res.sustained:
            break
    results.sort(key=lambda r: r.rate)
    return results, max((r.rate for r in results if r.sustained), default=None)
