"""A steady, deterministic write load on Postgres, run in its own process.

Default mix (per the product's freshness target): 50% text updates, 20% inserts, 15% metadata-only updates,
15% deletes; rows of 30-80 words, one chunk each.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

VOCAB = (
    "tide harbor current vessel anchor signal buoy channel pier keel rudder compass chart beacon reef shoal "
    "estuary delta inlet lagoon marsh dune cliff cove bay strait sound fjord glacier iceberg plankton kelp "
    "coral mussel oyster heron gull tern osprey pelican seal otter whale dolphin salmon herring cod tuna "
    "storm gale swell breaker spray fog mist drizzle squall thunder lightning horizon dawn dusk moon star "
    "sail mast hull deck cabin galley hatch bow stern port starboard ballast cargo freight ferry tanker trawler"
).split()
DEFAULT_MIX = {"update": 50, "insert": 20, "meta": 15, "delete": 15}


def parse_mix(text: str) -> dict[str, int]:
    """'update:insert:meta:delete' weights, e.g. '50:20:15:15'."""
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or sum(int(p) for p in parts) == 0:
        raise ValueError("--mix must be four non-negative integers update:insert:meta:delete, e.g. 50:20:15:15")
    return dict(zip(("update", "insert", "meta", "delete"), (int(p) for p in parts), strict=True))


def sentence(rng: random.Random) -> str:
    """30-80 words."""
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(30, 80)))


@dataclass(frozen=True)
class Workload:
    """What one writer process does."""

    dsn: str
    prefix: str  # row ids and topic of this run
    rate: float
    duration_s: float
    mix: dict[str, int]
    seed_rows: list[str]
    log_path: Path
    seed: int = 7


def seed_rows(dsn: str, prefix: str, n: int, seed: int = 3) -> list[str]:
    """Insert the rows that updates and deletes will target; returns their ids."""
    rng = random.Random(seed)
    ids = [f"{prefix}/s{i}" for i in range(n)]
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, %s, %s, %s, 'bench')"
            " ON CONFLICT (id) DO NOTHING",
            [(i, "bench", sentence(rng), prefix) for i in ids],
        )
    return ids


def run_workload(w: Workload) -> None:
    """Issue changes at a steady rate, each its own transaction; log (op, row, sent_ms) as JSON lines."""
    rng = random.Random(w.seed)
    live = list(w.seed_rows)
    ops, weights = zip(*w.mix.items(), strict=True)
    n_total = int(w.rate * w.duration_s)
    start = time.monotonic()
    next_id = 0
    with psycopg.connect(w.dsn, autocommit=True) as conn, open(w.log_path, "w", encoding="utf-8") as log:
        for i in range(n_total):
            delay = start + i / w.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            op = rng.choices(ops, weights)[0]
            if op != "insert" and not live:
                op = "insert"
            if op == "insert":
                row = f"{w.prefix}/n{next_id}"
                next_id += 1
                conn.execute(
                    "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, 'bench', %s, %s, 'bench')",
                    (row, sentence(rng), w.prefix),
                )
                live.append(row)
            elif op == "update":
                row = rng.choice(live)
                conn.execute("UPDATE public.docs SET body = %s WHERE id = %s", (sentence(rng), row))
            elif op == "meta":
                row = rng.choice(live)
                conn.execute("UPDATE public.docs SET category = %s WHERE id = %s", (f"bench-{i % 7}", row))
            else:
                row = live.pop(rng.randrange(len(live)))
                conn.execute("DELETE FROM public.docs WHERE id = %s", (row,))
            log.write(json.dumps({"op": op, "row": row, "sent_ms": int(time.time() * 1000)}) + "\n")
