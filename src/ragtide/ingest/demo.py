"""The demo corpus: the Python standard library's documentation topics (pydoc_data), a few hundred rows."""

from __future__ import annotations

import re

import psycopg

DEMO_DDL = """
CREATE TABLE IF NOT EXISTS public.docs (
    id          text PRIMARY KEY,
    title       text NOT NULL,
    body        text,
    topic       text NOT NULL,
    category    text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
)"""

_CATEGORIES = {
    "statements": (
        "assert",
        "assignment",
        "augassign",
        "break",
        "continue",
        "del",
        "exec",
        "for",
        "global",
        "if",
        "import",
        "nonlocal",
        "pass",
        "raise",
        "return",
        "try",
        "while",
        "with",
        "yield",
        "class",
        "function",
        "async",
        "match",
        "type",
    ),
    "expressions": (
        "atom",
        "attribute",
        "binary",
        "bitwise",
        "booleans",
        "calls",
        "comparisons",
        "conditional",
        "context",
        "lambda",
        "power",
        "shifting",
        "slicings",
        "subscriptions",
        "unary",
        "await",
        "lists",
        "dict",
        "string",
        "numbers",
        "integers",
        "floating",
        "imaginary",
        "formatstrings",
    ),
}


def category_of(topic: str) -> str:
    """A coarse category for the demo's filterable metadata."""
    for cat, prefixes in _CATEGORIES.items():
        if topic.startswith(prefixes):
            return cat
    return "datamodel" if ("types" in topic or "method" in topic or "special" in topic) else "reference"


def demo_rows(words_per_row: int = 120) -> list[dict[str, str]]:
    """Split each pydoc topic into rows of about `words_per_row` words, cut at paragraph boundaries."""
    from pydoc_data.topics import topics

    rows: list[dict[str, str]] = []
    for topic in sorted(topics):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", topics[topic]) if p.strip()]
        part: list[str] = []
        count = 0
        n = 0
        for para in paragraphs:
            part.append(para)
            count += len(para.split())
            if count >= words_per_row:
                rows.append(_row(topic, n, part))
                part, count, n = [], 0, n + 1
        if part:
            rows.append(_row(topic, n, part))
    return rows


def _row(topic: str, n: int, part: list[str]) -> dict[str, str]:
    heading = part[0].splitlines()[0][:120]
    return {
        "id": f"{topic}/{n}",
        "title": f"{topic}: {heading}",
        "body": "\n\n".join(part),
        "topic": topic,
        "category": category_of(topic),
    }


def create_demo_table(dsn: str) -> None:
    """Create the demo table (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DEMO_DDL)


def load_demo(dsn: str, limit: int | None = None) -> int:
    """Insert the demo rows that are not there yet; returns how many rows the table holds."""
    rows = demo_rows()[:limit] if limit else demo_rows()
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO public.docs (id, title, body, topic, category) VALUES (%(id)s, %(title)s, %(body)s,"
                " %(topic)s, %(category)s) ON CONFLICT (id) DO NOTHING",
                rows,
            )
        row = conn.execute("SELECT count(*) FROM public.docs").fetchone()
    return int(row[0]) if row else 0
