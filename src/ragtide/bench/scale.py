"""Scale-out measurements: how many records a rebalance made the embedders apply twice, read from their ack logs
(`batch.ack_log`: one JSON line per acknowledged batch and partition)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Ack:
    """One acknowledged span of one partition."""

    t: float
    topic: str
    partition: int
    first: int
    last: int


def read_ack_logs(paths: Iterable[Path]) -> list[Ack]:
    """Every worker's ack log, in time order (a file that was never written counts as empty)."""
    acks: list[Ack] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d: dict[str, Any] = json.loads(line)
                acks.append(Ack(float(d["t"]), str(d["topic"]), int(d["partition"]), int(d["first"]), int(d["last"])))
    return sorted(acks, key=lambda a: a.t)


def reprocessed(acks: Sequence[Ack], windows: Sequence[tuple[str, float, float]]) -> dict[str, int]:
    """Records acknowledged again (by any worker) after they were acknowledged once, counted in the window
    (name, start, end) where the repeat happened; 'other' counts repeats outside every window."""
    seen: dict[tuple[str, int], set[int]] = {}
    counts = {name: 0 for name, _, _ in windows} | {"other": 0}
    for a in acks:
        offsets = seen.setdefault((a.topic, a.partition), set())
        span = range(a.first, a.last + 1)
        again = sum(1 for o in span if o in offsets)
        offsets.update(span)
        if again:
            name = next((n for n, start, end in windows if start <= a.t < end), "other")
            counts[name] += again
    return counts


# --- `ragtide bench scale` ----------------------------------------------------------------------------------------

BENCH_TABLE = "public.bench_docs"
BENCH_SOURCE = {"table": BENCH_TABLE, "key": ["id"], "text": "{title}\n\n{body}"}
BENCH_DDL = "CREATE TABLE IF NOT EXISTS public.bench_docs (id int PRIMARY KEY, title text NOT NULL, body text NOT NULL)"
_WORDS = (
    "index stream change vector search replica shard partition broker commit offset batch embed token model query "
    "tenant snapshot backfill fresh latency rebalance leader follower catalog generation cluster node write read"
).split()


def load_rows(dsn: str, n: int, seed: int = 5, first: int = 1) -> None:
    """Rows `first`..`n` of about 80 words (one chunk each), in one COPY."""
    import random

    import psycopg

    rng = random.Random(seed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BENCH_DDL)
        with conn.cursor().copy("COPY public.bench_docs (id, title, body) FROM STDIN") as copy:
            for i in range(first, n + 1):
                body = " ".join(rng.choice(_WORDS) for _ in range(80))
                copy.write_row((i, f"document {i}", body))


@dataclass
class ScaleRun:
    """One backfill: `embedders` processes of `encoder` through the whole table."""

    encoder: str
    embedders: int
    rows: int
    seconds: float
    rows_per_s: float
    chunks_per_s: float
    freshness_s: dict[str, Any]  # commit -> searchable of probe changes written during the backfill
    probes_lost: int
    reprocessed: int
    rewinds: int = 0  # partitions the embedders sought back (records lost in flight by faust-streaming)


def _percentiles(values: Sequence[float]) -> dict[str, Any]:
    from ragtide.contracts.freshness import summarize

    return summarize(list(values))


class Prober:
    """One probe change per second on the fault table while a backfill runs, each timed from its commit until a
    search through the retriever returns it (what a user sees); a steady write load of `rate` changes/s runs
    beside it."""

    def __init__(self, dsn: str, retriever: str, run: str) -> None:
        import threading

        self.dsn = dsn
        self.retriever = retriever
        self.run = run
        self.took: list[float] = []
        self.lost = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> Prober:
        import threading

        def loop() -> None:
            n = 0
            while not self._stop.wait(1.0):
                t = threading.Thread(target=self._probe, args=(n,), daemon=True)
                t.start()
                self._threads.append(t)
                n += 1

        threading.Thread(target=loop, daemon=True).start()
        return self

    def _probe(self, n: int, timeout_s: float = 120.0) -> None:
        import time

        import httpx
        import psycopg

        label = f"probe-{self.run}-{n}"
        row = 5_000_000 + abs(hash(label)) % 1_000_000
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.faults (id, rid, body, label) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET label = EXCLUDED.label, body = EXCLUDED.body",
                (row, row, f"probe {label}", label),
            )
        t0 = time.monotonic()
        body = {"query": "probe", "k": 1, "filter": {"label": label}}
        with httpx.Client() as client:
            while time.monotonic() - t0 < timeout_s:
                if self._stop.is_set():  # the run is over (or the benchmark stopped): neither found nor lost
                    return
                try:
                    hits = client.post(f"{self.retriever}/v1/search", json=body, timeout=10).json().get("hits")
                except (httpx.HTTPError, ValueError):
                    hits = None
                if hits:
                    with self._lock:
                        self.took.append(round(time.monotonic() - t0, 3))
                    return
                # Searches every 50 ms at first, then every 2% of the time waited: exact to 2%, and probes that
                # wait long (the backfill ahead of them) do not flood the cluster with searches. At a fixed 50 ms,
                # ~40 probes waiting ~40 s each asked for up to 800 searches/s, and Qdrant's search threads took the
                # cores from the backfill they measured.
                time.sleep(max(0.05, 0.02 * (time.monotonic() - t0)))
        with self._lock:
            self.lost += 1

    def stop(self) -> None:
        """Stop probing; probes still waiting end within one search's timeout (10 s)."""
        import time

        self._stop.set()
        deadline = time.monotonic() + 15
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))


def bench_settings(base_port: int, data: Path) -> Any:
    """A cluster of its own for the benchmark: a temporary data folder, the benchmark's table and the fault table
    as the sources, no local generator, no canary (its writes would be measured)."""
    import yaml

    from ragtide.bench.faults import SOURCE
    from ragtide.contracts.settings import RagtideSettings, load_settings
    from ragtide.stack.process import free_port

    (data / "sources.yaml").write_text(yaml.safe_dump({"sources": [BENCH_SOURCE, SOURCE]}))
    return load_settings(
        RagtideSettings,
        data_dir=data,
        sources_file=data / "sources.yaml",
        postgres={"port": free_port()},
        generator={"local": False, "port": free_port()},
        cluster={"base_port": base_port, "embedders": 1, "retrievers": 1, "ack_logs": True},
        canary={"enabled": False},
        kafka={"session_timeout_s": 10},
    )


def run_one(base: Any, encoder: str, n: int, rows: int, rate: float, log: Callable[[str], None]) -> ScaleRun:
    """Backfill the table with `n` embedder processes of a fresh consumer group into a fresh collection, with a
    steady write load and probes running; then stop them."""
    import asyncio
    import time

    from ragtide.bench.faults import WriteLoad
    from ragtide.embedder.index.factory import open_index
    from ragtide.embedder.liveness import consumed, end_offsets
    from ragtide.stack.cluster import Cluster
    from ragtide.stack.process import wait_until

    name = f"{encoder.replace('-', '_')}_{n}"
    settings = base.model_copy(
        update={
            "index": base.index.model_copy(update={"collection": f"bench_{name}"}),
            "kafka": base.kafka.model_copy(update={"group": f"bench-{name}"}),
            "encoder": base.encoder.model_copy(update={"backend": encoder}),
        }
    )
    c = Cluster(settings)
    for i in range(8):
        c.ack_log(i).unlink(missing_ok=True)
    c.start_retriever(0)
    topic = f"{settings.connect.topic_prefix}.{BENCH_TABLE}"
    targets = asyncio.run(end_offsets(c.settings.kafka, [topic]))
    faults = f"{settings.connect.topic_prefix}.public.faults"
    asyncio.run(start_at_end(c.settings.kafka, f"bench-{name}", [faults]))
    load = WriteLoad(settings.postgres.dsn(), rate=rate, seed=n, first_id=10_000_000 * n)
    load.start()
    prober = Prober(settings.postgres.dsn(), c.retriever_urls()[0], name).start()
    log(f"{encoder}, {n} embedder(s): backfilling {rows} rows")
    try:
        c.start_embedders(list(range(n)))
        wait_until(lambda: asyncio.run(consumed(c.settings.kafka, f"bench-{name}", targets)), "the backfill", 7200)
        rewinds = sum(_rewinds(f"http://127.0.0.1:{c.port('embedder', i)}/metrics") for i in range(n))
    finally:
        load.stop()
        prober.stop()
        for i in range(n):
            c.daemon(f"embedder-{i}").stop(timeout=60)
        c.daemon("retriever-0").stop(timeout=30)
    acks = [a for a in read_ack_logs(c.ack_log(i) for i in range(n)) if a.topic == topic]
    seconds = max(1e-3, acks[-1].t - acks[0].t)
    index = open_index(c.settings, f"bench_{name}-{_fingerprint(c.settings)}")
    chunks = index.count({"table": BENCH_TABLE})
    index.close()
    again = reprocessed(acks, [])["other"]
    result = ScaleRun(
        encoder=encoder,
        embedders=n,
        rows=rows,
        seconds=round(seconds, 1),
        rows_per_s=round(rows / seconds, 1),
        chunks_per_s=round(chunks / seconds, 1),
        freshness_s=_percentiles(prober.took),
        probes_lost=prober.lost,
        reprocessed=again,
        rewinds=rewinds,
    )
    log(f"  {result.rows_per_s} rows/s, {result.chunks_per_s} chunks/s, freshness {result.freshness_s}")
    time.sleep(1)
    return result


async def start_at_end(kafka: Any, group: str, topics: Sequence[str]) -> None:
    """Commit `group`'s offsets at the end of `topics` before it starts: the fault table's earlier runs are not
    replayed (the group still reads the benchmark's table from its start)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.structs import OffsetAndMetadata

    from ragtide.embedder.liveness import end_offsets

    ends = await end_offsets(kafka, topics)
    if not ends:  # no such topic yet: nothing to skip
        return
    consumer = AIOKafkaConsumer(**kafka.client_config(), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = {TopicPartition(t, p): OffsetAndMetadata(end, "") for (t, p), end in ends.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


def _rewinds(metrics_url: str) -> int:
    """ragtide_embedder_partition_rewinds_total of one embedder (0 when it does not answer)."""
    import httpx

    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return 0
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ragtide_embedder_partition_rewinds_total")
        )
    )


def _fingerprint(settings: Any) -> str:
    """The live generation's fingerprint, from the catalog."""
    from ragtide.embedder.generations import Catalog
    from ragtide.embedder.index.factory import open_index

    catalog = Catalog(open_index(settings, f"{settings.index.collection}-catalog"))
    live = catalog.read().live
    catalog.index.close()
    assert live is not None, "no generation was created"
    return live.fingerprint


@dataclass
class ScaleReport:
    """What `ragtide bench scale` writes under bench/results/."""

    machine: dict[str, Any]
    rows: dict[str, int]
    rate: float
    topology: dict[str, Any]
    runs: list[ScaleRun] = field(default_factory=list)

    def table(self) -> str:
        """A Markdown table of the runs (the README's)."""
        lines = [
            "| encoder | embedders | rows | rows/s | chunks/s | freshness p50 / p95 (s) | reprocessed | rewinds |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in self.runs:
            f = r.freshness_s
            lines.append(
                f"| {r.encoder} | {r.embedders} | {r.rows} | {r.rows_per_s} | {r.chunks_per_s} | "
                f"{f.get('p50')} / {f.get('p95')}{f' ({r.probes_lost} probes lost)' if r.probes_lost else ''} | "
                f"{r.reprocessed} | {r.rewinds} |"
            )
        return "\n".join(lines)

    def write(self, directory: Path, stem: str | None = None) -> tuple[Path, Path | None]:
        """bench/results/scale-<time>.json and its PNG (rows/s by embedders, per encoder); `stem` rewrites the
        files of an earlier call (the benchmark writes after every run, so that a stopped one keeps its results)."""
        import time

        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or time.strftime("scale-%Y%m%d-%H%M%S", time.gmtime())
        path = directory / f"{stem}.json"
        path.write_text(json.dumps({**asdict(self), "table": self.table()}, indent=2))
        return path, self.plot(directory / f"{stem}.png")

    def plot(self, path: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for enc in sorted({r.encoder for r in self.runs}):
            mine = [r for r in self.runs if r.encoder == enc]
            axes[0].plot([r.embedders for r in mine], [r.rows_per_s for r in mine], "o-", label=enc)
            axes[1].plot([r.embedders for r in mine], [r.freshness_s.get("p50") for r in mine], "o-", label=enc)
        axes[0].set_title("backfill rows/s (log scale)")
        axes[0].set_yscale("log")
        axes[1].set_title(f"freshness p50 (s) at {self.rate:g} changes/s during the backfill")
        for ax in axes:
            ax.set_xlabel("embedder processes")
            ax.set_xticks(sorted({r.embedders for r in self.runs}))
            ax.legend()
        fig.suptitle(f"{self.machine.get('model')}, {self.machine.get('cpus')} CPUs, {self.machine.get('features')}")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def run(
    rows: int,
    model_rows: int,
    counts: Sequence[int],
    rate: float,
    out: Path,
    log: Callable[[str], None] = print,
) -> tuple[ScaleReport, Path, Path | None]:
    """The whole benchmark on a cluster of its own (stopped and removed at the end): the table loaded once and
    snapshotted into Kafka by Debezium, then one backfill per (encoder, embedder count), each a fresh consumer
    group into a fresh collection. The real model backfills the first `model_rows` rows' worth of time only."""
    import asyncio
    import shutil
    import tempfile
    import time

    import psycopg

    from ragtide.bench.faults import DDL
    from ragtide.contracts.machine import cpu_info
    from ragtide.contracts.settings import CLUSTER_PORT_SPAN
    from ragtide.embedder.liveness import end_offsets
    from ragtide.stack.cluster import Cluster
    from ragtide.stack.postgres import PostgresCluster
    from ragtide.stack.process import free_port_range, wait_until

    data = Path(tempfile.mkdtemp(prefix="ragtide-bench-scale-"))
    data.chmod(0o755)
    settings = bench_settings(free_port_range(CLUSTER_PORT_SPAN), data)
    c = Cluster(settings)
    report = ScaleReport(
        machine=cpu_info(),
        rows={"random-unit": rows, "engine": model_rows},
        rate=rate,
        topology={
            "qdrant_nodes": settings.cluster.qdrant_nodes,
            "shards": settings.cluster.shards,
            "replication_factor": min(2, settings.cluster.qdrant_nodes),
            "brokers": settings.cluster.brokers,
            "partitions": settings.cluster.partitions,
        },
    )
    stem = time.strftime("scale-%Y%m%d-%H%M%S", time.gmtime())
    try:
        PostgresCluster(c.settings, c.daemon("postgres")).start()
        with psycopg.connect(c.settings.postgres.dsn(), autocommit=True) as conn:
            conn.execute(DDL)
        topic = f"{settings.connect.topic_prefix}.{BENCH_TABLE}"

        def in_kafka(n: int) -> Callable[[], bool]:
            return lambda: sum(asyncio.run(end_offsets(c.settings.kafka, [topic])).values()) >= n

        # The model embeds ~20 rows/s on 2 shared cores: it backfills a table of `model_rows` first; then the
        # table grows to `rows` for the write path alone (random unit vectors).
        log(f"loading {model_rows} rows")
        load_rows(c.settings.postgres.dsn(), model_rows)
        c.up(lambda what: log(f"starting {what}"), ragtide=False)
        wait_until(in_kafka(model_rows), "Debezium's snapshot of the table", 1800)

        def done(result: ScaleRun) -> None:
            report.runs.append(result)
            report.write(out, stem)  # after every run: a benchmark stopped later keeps what it measured

        for n in counts if model_rows > 0 else ():
            done(run_one(settings, "engine", n, model_rows, rate, log))
        if rows > model_rows:
            log(f"loading rows up to {rows}")
            load_rows(c.settings.postgres.dsn(), rows, first=model_rows + 1)
            wait_until(in_kafka(rows), "Debezium to stream the new rows", 1800)
        for n in counts if rows > 0 else ():
            done(run_one(settings, "random-unit", n, max(rows, model_rows), rate, log))
    finally:
        c.down()
        shutil.rmtree(data, ignore_errors=True)
    json_path, png = report.write(out, stem)
    return report, json_path, png
