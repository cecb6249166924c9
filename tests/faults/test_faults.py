"""The fault suite: random SIGKILLs of the node, Connect, Kafka and the Postgres postmaster under a steady write load
(inserts, text updates, metadata-only updates, deletes), each restarted by the supervisor as `ragtide up
--supervise` does; then Postgres and search are compared row by row: 0 lost, 0 stale, 0 ghosts, `verify` at 0
drift, and an empty dead-letter topic.

`make test-faults` runs RAGTIDE_FAULTS faults (CI: 4, one of each kind); `make test-faults FAULTS=100` writes the
JSON report with the recovery times per fault kind under bench/results/. Recovery times are reported, never
asserted (they are a benchmark); only "fresh again within the deadline" is.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import asdict

import httpx

from ragtide.bench.faults import FAULT_KINDS, SOURCE, FaultReport, WriteLoad, audit, await_recovery, inject
from ragtide.contracts.machine import cpu_info
from ragtide.contracts.settings import REPO_ROOT
from ragtide.embedder.dlq import list_dead_letters
from ragtide.stack.stack import Stack
from ragtide.stack.supervise import Supervisor

FAULTS = int(os.environ.get("RAGTIDE_FAULTS", "4"))
SEED = int(os.environ.get("RAGTIDE_FAULTS_SEED", "1"))
RATE = float(os.environ.get("RAGTIDE_FAULTS_RATE", "20"))
RECOVERY_DEADLINE_S = 240.0
REPORT_FROM = 20  # a run of at least this many faults writes its report under bench/results/


def test_random_kills_under_load_lose_nothing(stack: Stack) -> None:
    s = stack.settings
    dsn, api = s.postgres.dsn(), s.api.url
    report = FaultReport(faults=FAULTS, seed=SEED, rate=RATE, machine=cpu_info())
    rng = random.Random(SEED)
    kinds = [FAULT_KINDS[i % len(FAULT_KINDS)] for i in range(FAULTS)]  # each kind as often, in random order
    rng.shuffle(kinds)

    load = WriteLoad(dsn, rate=RATE, seed=SEED)
    supervisor = Supervisor(stack, names=["postgres", "kafka", "connect", "node"])
    assert supervisor.watched == ["postgres", "kafka", "connect", "node"]
    stop = threading.Event()
    supervising = threading.Thread(target=supervisor.run, args=(stop,), daemon=True)
    load.start()
    supervising.start()
    try:
        for n, kind in enumerate(kinds):
            time.sleep(rng.uniform(1.0, 4.0))  # the load runs between faults too
            killed_at = time.monotonic()
            inject(stack, kind)
            recovery = await_recovery(api, dsn, kind, n, killed_at, RECOVERY_DEADLINE_S)
            report.recoveries.append(recovery)
            print(f"fault {n + 1}/{FAULTS} {kind}: search {recovery.search_s} s, fresh {recovery.fresh_s} s")
            assert recovery.fresh_s is not None, (
                f"fault {n} ({kind}): not fresh again in {RECOVERY_DEADLINE_S:.0f} s; restarts: {supervisor.restarts}"
            )
        load.stop()
        # One probe after the last change: once it is searchable, every change before it on the table's single
        # partition has been applied.
        final = await_recovery(api, dsn, "final", FAULTS, time.monotonic(), RECOVERY_DEADLINE_S)
        assert final.fresh_s is not None, "the last changes never became searchable"
    finally:
        load.stop()
        stop.set()
        supervising.join(timeout=30)

    report.changes, report.failed_changes = dict(load.counts), load.failed
    report.restarts = [asdict(r) for r in supervisor.restarts]
    report.audit = audit(api, dsn, load.ever)
    verified = httpx.post(f"{api}/v1/admin/verify", json={"table": SOURCE["table"]}, timeout=300)
    verified.raise_for_status()
    report.verify_drift = int(verified.json()["drift"])
    report.dead_letters = len(asyncio.run(list_dead_letters(s.kafka, s.dlq_topic)))
    if FAULTS >= REPORT_FROM:
        print(f"report: {report.write(REPO_ROOT / 'bench' / 'results')}")
    print({"by_kind": report.by_kind(), "changes": report.changes, "audit": asdict(report.audit)})

    assert load.errors == []
    assert sum(load.counts.values()) > RATE * 2 and all(load.counts.values())  # the load really ran, every kind
    assert report.audit.live_rows > 0
    assert (report.audit.lost, report.audit.stale, report.audit.ghosts) == ([], [], [])
    assert report.verify_drift == 0
    assert report.dead_letters == 0
