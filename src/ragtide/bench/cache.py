"""`ragtide bench cache`: replay paraphrased questions against the running stack and measure the answer cache.

The question set is generated deterministically from the demo corpus' topics: each topic's first question,
then repeats, near-duplicates (case, punctuation) and paraphrases of it, interleaved with questions about other
topics. For every hit, a fresh retrieval with the same query and k tells whether the cached answer cites the
rows a fresh answer would (a *wrong hit* when not). Then staleness: for rows the bench owns, an answer is cached,
the row is changed in Postgres, and the same question is asked again once the change is searchable; a hit
there is a *stale hit* (the target is zero).
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from ragtide.bench import save_result
from ragtide.contracts.freshness import summarize_ms

TOPICS = [
    ("exceptions", "exceptions"),
    ("try", "the try statement"),
    ("for", "the for loop"),
    ("with", "the with statement"),
    ("lambda", "lambda expressions"),
    ("import", "the import statement"),
    ("class", "class definitions"),
    ("yield", "yield expressions"),
    ("formatstrings", "format strings"),
    ("slicings", "slicing"),
    ("global", "the global statement"),
    ("async", "async functions"),
]
FIRST = "How does {t} work in Python?"
REPEATS = [
    "How does {t} work in Python?",  # verbatim
    "how does {t} work in python?",  # case
    "How does {t} work in Python",  # punctuation
    "How does {t} work in Python ?",
]
PARAPHRASES = [
    "In Python, how does {t} work?",
    "How do {t} work in Python?",
    "Explain how {t} works in Python.",
]
NEW = "What are common mistakes with {t} in Python?"
ISLANDS = ["Skye", "Mull", "Arran", "Islay", "Jura", "Orkney", "Shetland", "Lewis", "Harris", "Barra"]


def questions(seed: int = 7) -> list[tuple[str, str, str]]:
    """(kind, topic id, question) in replay order: first asks, then a shuffled mix of the rest."""
    rng = random.Random(seed)
    first = [("first", tid, FIRST.format(t=t)) for tid, t in TOPICS]
    rest = [("repeat", tid, q.format(t=t)) for tid, t in TOPICS for q in REPEATS]
    rest += [("paraphrase", tid, q.format(t=t)) for tid, t in TOPICS for q in PARAPHRASES]
    rest += [("new", tid, NEW.format(t=t)) for tid, t in TOPICS]
    rng.shuffle(rest)
    return first + rest


@dataclass
class Asked:
    """One replayed question."""

    kind: str
    question: str
    hit: bool
    seconds: float
    similarity: float | None = None
    wrong: bool = False
    server_s: float = 0.0


@dataclass
class CacheBench:
    """The whole run."""

    api: str
    k: int
    max_tokens: int
    threshold: float | None
    asked: list[Asked] = field(default_factory=list)
    stale_checks: int = 0
    stale_hits: int = 0
    started: str = ""

    def summary(self) -> dict[str, Any]:
        """Hit rate by kind, wrong-hit rate, latency hit vs miss, stale hits."""
        hits = [a for a in self.asked if a.hit]
        misses = [a for a in self.asked if not a.hit]
        by_kind = {}
        for kind in ("first", "repeat", "paraphrase", "new"):
            group = [a for a in self.asked if a.kind == kind]
            by_kind[kind] = {"asked": len(group), "hits": sum(a.hit for a in group)}
        return {
            "questions": len(self.asked),
            "hit_rate": round(len(hits) / len(self.asked), 4) if self.asked else None,
            "wrong_hits": sum(a.wrong for a in hits),
            "wrong_hit_rate": round(sum(a.wrong for a in hits) / len(hits), 4) if hits else None,
            "by_kind": by_kind,
            "hit_ms": summarize_ms([a.seconds for a in hits]),
            "miss_ms": summarize_ms([a.seconds for a in misses]),
            "hit_server_ms": summarize_ms([a.server_s for a in hits]),
            "miss_server_ms": summarize_ms([a.server_s for a in misses]),
            "stale_checks": self.stale_checks,
            "stale_hits": self.stale_hits,
        }

    def save(self, out: Path) -> Path:
        """bench/results/cache-<time>.json"""
        return save_result({**asdict(self), "summary": self.summary()}, out, "cache", self.started)


def _answer(http: httpx.Client, query: str, k: int, max_tokens: int) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    resp = http.post("/v1/answer", json={"query": query, "k": k, "max_tokens": max_tokens})
    took = time.perf_counter() - t0
    resp.raise_for_status()
    return resp.json(), took


def _fresh_rows(http: httpx.Client, query: str, k: int) -> set[tuple[str, str]]:
    hits = http.post("/v1/search", json={"query": query, "k": k}).json()["hits"]
    return {(h["table"], h["row_id"]) for h in hits}


def replay(
    api: str, dsn: str, k: int, max_tokens: int, stale_rows: int, admin: dict[str, str], log: Any = print
) -> CacheBench:
    """Run the replay (from an empty cache) and the staleness checks; bounded by the fixed question set."""
    bench = CacheBench(api, k, max_tokens, None, started=time.strftime("%Y%m%d-%H%M%S"))
    run = uuid.uuid4().hex[:6]
    with httpx.Client(base_url=api, timeout=180) as http:
        http.post("/v1/admin/cache/clear", headers=admin).raise_for_status()
        for kind, _, question in questions():
            q = question
            body, took = _answer(http, q, k, max_tokens)
            asked = Asked(kind, question, bool(body["cache"]["hit"]), took, body["cache"].get("similarity"))
            asked.server_s = body["took_ms"] / 1000
            if asked.hit:  # wrong: the cached answer cites other rows than a fresh answer would
                cited = {(c["table"], c["row_id"]) for c in body["citations"]}
                asked.wrong = cited != _fresh_rows(http, q, k)
            bench.asked.append(asked)
        log(f"replayed {len(bench.asked)} questions")
        bench.stale_checks, bench.stale_hits = staleness(http, dsn, run, k, max_tokens, stale_rows)
    return bench


def staleness(http: httpx.Client, dsn: str, run: str, k: int, max_tokens: int, rows: int) -> tuple[int, int]:
    """Cache an answer about a row, change the row, ask again once the change is searchable: hits are stale."""
    checks = stale = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(rows):
            rid = f"bench-cache/{run}/{i}"
            word = ISLANDS[i % len(ISLANDS)]
            conn.execute(
                "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%s, 'bench', %s, 'bench-cache',"
                " 'bench')",
                (rid, f"The lighthouse on {word} keeps a red lantern in its tower."),
            )
            question = f"What does the lighthouse on {word} keep?"
            _wait(http, word, rid, "red lantern")
            _answer(http, question, k, max_tokens)
            second, _ = _answer(http, question, k, max_tokens)
            if not second["cache"]["hit"]:
                continue  # nothing cached to go stale
            conn.execute("UPDATE public.docs SET body = %s WHERE id = %s",
                         (f"The lighthouse on {word} keeps a green lantern in its tower.", rid))  # fmt: skip
            _wait(http, word, rid, "green lantern")
            third, _ = _answer(http, question, k, max_tokens)
            checks += 1
            stale += bool(third["cache"]["hit"])
        conn.execute("DELETE FROM public.docs WHERE id LIKE %s", (f"bench-cache/{run}/%",))
    return checks, stale


def _wait(http: httpx.Client, word: str, rid: str, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = http.post("/v1/search", json={"query": f"lighthouse on {word}", "k": 10}).json()["hits"]
        if any(h["row_id"] == rid and text in h["text"] for h in hits):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{rid} did not become searchable with {text!r}")
