"""`ragtide bench write`: the write path's own speed, with embeddings made free.

One process applies a backfill of change events (rows of 30-80 words, every seventh row seven times longer) to
the embedded Qdrant engine through the real `IndexWriter`: the real chunker and tokenizer, the diff against
stored hashes, payloads, upserts. The encoder returns random unit vectors (`FreeEncoder`, defined here so that
every contender gets the same one, whatever its `encoder.backend: random-unit` costs), so what is measured is
everything a GPU leaves to the CPU. Afterwards `verify` compares every row with the index
(drift must be 0).

Each contender runs in a process of its own over the same rows: this checkout, and with `--baseline REV` the
code of another git revision (a worktree), alternately, best of `--repeats`. The contender's process runs this
file as a script with that tree's `src` first on its path, so this module imports nothing of ragtide at its top:
only `measure` does, from whichever tree it runs against.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TABLE = {
    "table": "public.docs",
    "key": ["id"],
    "text": "{title}\n\n{body}",
    "metadata": ["topic", "category"],
}


def corpus(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """`n` rows of the bench table: bodies of 30-80 words of the workload's vocabulary, every seventh 7x longer."""
    from ragtide.bench.workload import VOCAB

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.randint(30, 80) * (7 if i % 7 == 0 else 1)
        body = " ".join(rng.choice(VOCAB) for _ in range(words))
        rows.append({"id": i, "title": f"Row {i}", "body": body, "topic": rng.choice(VOCAB), "category": "bench"})
    return rows


class FreeEncoder:
    """Embeddings made free: the model's tokenizer (for chunking) and, per text, a row of a fixed table of random
    unit vectors picked by the text's hash (Python's own string hash, the same for a text within a process, and a
    gather: a fraction of a microsecond a text)."""

    model_name = "free"
    provider = "local"
    precision = "float"
    dim = 384
    max_tokens = 254  # as the packaged model's window

    def __init__(self) -> None:
        import numpy as np
        from transformers import AutoTokenizer

        from ragtide.embedder.encoder import default_model_path

        self.tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
        table = np.random.default_rng(0).standard_normal((4096, self.dim)).astype(np.float32)
        self._table = table / np.linalg.norm(table, axis=1, keepdims=True)

    def encode(self, texts: Sequence[str]) -> Any:
        """One unit vector per text."""
        import numpy as np

        picks = np.fromiter((hash(t) & 4095 for t in texts), dtype=np.intp, count=len(texts))
        return self._table[picks]


def measure(rows_file: Path, batch: int) -> dict[str, Any]:
    """Apply the rows as Debezium snapshot reads, `batch` events at a time, into a fresh embedded collection;
    then verify. Runs in the contender's process (its ragtide)."""
    from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
    from ragtide.contracts.settings import RagtideSettings
    from ragtide.embedder.chunking import Chunker
    from ragtide.embedder.index.edge import EdgeIndex
    from ragtide.embedder.verify import verify_table
    from ragtide.embedder.writer import IndexWriter
    from ragtide.ingest.sources import SourcesConfig

    rows = json.loads(rows_file.read_text())
    sources = SourcesConfig.model_validate({"sources": [TABLE]})
    source = sources.sources[0]
    chunking = RagtideSettings().chunking
    encoder = FreeEncoder()
    chunker = Chunker(encoder.tokenizer, min(chunking.max_tokens, encoder.max_tokens), chunking.overlap_tokens)
    events = [
        ChangeEvent(
            source.id, Op.READ, {"id": r["id"]}, r, SourcePosition(1_000 + i, 1_700_000_000_000), partition=0, offset=i
        )
        for i, r in enumerate(rows)
    ]
    with tempfile.TemporaryDirectory(prefix="ragtide-bench-write-") as tmp:
        index = EdgeIndex(Path(tmp), "bench")
        index.ensure_collection(encoder.dim)
        # as the node builds it for an encoder that spares the CPU (a revision without the option: as it was)
        pipelined = "pipeline" in inspect.signature(IndexWriter).parameters
        options: dict[str, Any] = {"pipeline": True} if pipelined else {}
        writer = IndexWriter(index, encoder, chunker, sources, **options)
        # What a long-running node loads once (the tokenizer's vocabulary for chunking) is loaded before the clock
        # starts: the measure is the steady write path.
        chunker("warm up")
        encoder.encode(["warm up"])
        chunks = 0
        t0 = time.perf_counter()
        for i in range(0, len(events), batch):
            chunks += writer.apply(events[i : i + batch]).embedded
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        drift = verify_table(source, SourcePosition(10**12, 0), rows, index, writer)
        verify_s = time.perf_counter() - t1
        points = index.count()
        index.close()
    return {
        "rows": len(rows),
        "chunks": chunks,
        "points": points,
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(rows) / seconds, 1),
        "chunks_per_s": round(chunks / seconds, 1),
        "verify_drift": drift.drift,
        "verify_s": round(verify_s, 2),
    }


def run_contender(src: Path, rows_file: Path, batch: int) -> dict[str, Any]:
    """One measurement in a fresh process whose `ragtide` is the one under `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "RAGTIDE_JSON_LOGS": "true"}
    proc = subprocess.run(
        # -P: this file's folder stays off the path, so `ragtide` is imported from `src` alone
        [sys.executable, "-P", __file__, "--rows-file", str(rows_file), "--batch", str(batch)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the contender under {src} failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@contextmanager
def worktree(repo: Path, rev: str) -> Iterator[tuple[str, Path]]:
    """A detached worktree of `rev`: (short hash, its src folder); removed afterwards."""
    git = ["git", "-C", str(repo)]
    short = subprocess.run([*git, "rev-parse", "--short", rev], capture_output=True, text=True)
    if short.returncode != 0:
        raise ValueError(f"--baseline {rev}: {short.stderr.strip()}")
    tree = Path(tempfile.mkdtemp(prefix="ragtide-baseline-"))
    added = subprocess.run([*git, "worktree", "add", "--detach", str(tree), rev], capture_output=True, text=True)
    if added.returncode != 0:
        tree.rmdir()
        raise RuntimeError(f"git worktree add {rev}: {added.stderr.strip()}")
    try:
        yield short.stdout.strip(), tree / "src"
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run([*git, "worktree", "prune"], capture_output=True)


def run(
    n: int,
    batch: int,
    repeats: int,
    baseline: str | None,
    repo: Path,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """This checkout against `baseline` (if given), alternately, best of `repeats` each."""
    from ragtide.contracts.machine import cpu_info

    this_src = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="ragtide-bench-write-rows-") as tmp, _baseline(repo, baseline) as base:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(corpus(n)))
        contenders = {"this code": this_src, **({f"baseline {base[0]}": base[1]} if base else {})}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
        for r in range(repeats):
            for name, src in contenders.items():
                res = run_contender(src, rows_file, batch)
                log(f"{name} (run {r + 1}): {res['chunks_per_s']:.0f} chunks/s, verify drift {res['verify_drift']}")
                runs[name].append(res)
    best = {name: max(rs, key=lambda x: x["chunks_per_s"]) for name, rs in runs.items()}
    result: dict[str, Any] = {
        "machine": cpu_info(),
        "rows": n,
        "batch": batch,
        "encoder": "free (random unit vectors from a hash, the same in every contender)",
        "index": "embedded (qdrant-edge)",
        "repeats": repeats,
        "contenders": best,
        "runs": runs,
    }
    medians = {name: statistics.median(r["chunks_per_s"] for r in rs) for name, rs in runs.items()}
    result["median_chunks_per_s"] = medians
    if len(best) == 2:
        mine, theirs = best.values()
        result["speedup"] = round(mine["chunks_per_s"] / theirs["chunks_per_s"], 2)
        m_mine, m_theirs = medians.values()
        result["speedup_median"] = round(m_mine / m_theirs, 2)
    return result


@contextmanager
def _baseline(repo: Path, rev: str | None) -> Iterator[tuple[str, Path] | None]:
    if rev is None:
        yield None
        return
    with worktree(repo, rev) as base:
        yield base


def render(result: dict[str, Any]) -> str:
    """A Markdown table of the contenders."""
    lines = [
        "| contender | rows | chunks | seconds | rows/s | chunks/s | verify drift |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["contenders"].items():
        lines.append(
            f"| {name} | {r['rows']} | {r['chunks']} | {r['seconds']} | {r['rows_per_s']} | {r['chunks_per_s']} "
            f"| {r['verify_drift']} |"
        )
    if "speedup" in result:
        lines.append(f"\nthis code / baseline: {result['speedup']}x (best runs), {result['speedup_median']}x (medians)")
    return "\n".join(lines)


def save(result: dict[str, Any], out: Path) -> Path:
    """Write the JSON result; returns its path."""
    from ragtide.bench import save_result

    return save_result(result, out, "write")


def main(argv: Sequence[str] | None = None) -> None:
    """The contender's process: measure once, print the result as one JSON line."""
    p = argparse.ArgumentParser(description="one write-path measurement (run by `ragtide bench write`)")
    p.add_argument("--rows-file", type=Path, required=True)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.rows_file, args.batch)))


if __name__ == "__main__":
    main()
