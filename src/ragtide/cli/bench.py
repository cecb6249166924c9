"""`ragtide bench`: the benchmarks; each command runs library code in `ragtide.bench` and prints its tables."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ragtide.cli.common import app, configured_settings, console, current_settings, loopback_api

bench_app = typer.Typer(help="Benchmarks against the running stack (start it with `make up`).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("embed")
def bench_embed(
    device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "auto",
    n: Annotated[int, typer.Option("--n", help="chunks in the corpus (100000 on a GPU)")] = 1000,
    repeats: Annotated[int, typer.Option(help="timed runs per contender (best counts)")] = 2,
    dtype: Annotated[
        str,
        typer.Option(
            help="engine precision: auto (fp16 on CUDA; bf16, int8 (the packaged model) or fp32 by CPU "
            "features), fp32, fp16, bf16, int8 (CPU)"
        ),
    ] = "auto",
    model: Annotated[Path | None, typer.Option(help="model folder (default: the packaged all-MiniLM-L6-v2)")] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
    variants: Annotated[
        bool,
        typer.Option(
            help="also time the engine's other settings (fp32 and int8 on CPU; bf16, Rust tokenizer, ids on CUDA)"
        ),
    ] = True,
    compile: Annotated[bool, typer.Option("--compile", help="also time the engine under torch.compile")] = False,
) -> None:
    """Naive sentence-transformers vs the embedding engine, side by side: chunks/s, tokens/s, small-batch
    latency, peak GPU memory and cosine deviation from the fp32 reference (needs no running stack)."""
    from ragtide.bench import embed
    from ragtide.embedder.encoder import resolve_device

    if dtype not in ("auto", "fp32", "fp16", "bf16", "int8"):
        raise typer.BadParameter("one of auto, fp32, fp16, bf16, int8", param_hint="--dtype")
    if n < 64:
        raise typer.BadParameter("at least 64 chunks", param_hint="--n")
    result = embed.run(
        model or embed.default_model_dir(),
        resolve_device(device),
        n,
        repeats,
        dtype=dtype,
        variants=variants,
        compile=compile,
        log=console.print,
    )
    print(embed.render(result))
    console.print(f"result: {embed.save(result, out)}")


@bench_app.command("write")
def bench_write(
    n: Annotated[int, typer.Option("--n", help="rows in the backfill")] = 20_000,
    batch: Annotated[int, typer.Option(help="events per batch (256: the CPU default; 4096: CUDA's)")] = 256,
    repeats: Annotated[int, typer.Option(help="runs per contender, alternating (best counts)")] = 2,
    baseline: Annotated[
        str | None, typer.Option(help="also run the write path of this git revision, side by side")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
) -> None:
    """The write path with embeddings made free (random unit vectors): chunking, diffing, payloads, upserts into
    the embedded engine, in one process; `verify` after each run (needs no running stack)."""
    from ragtide.bench import write

    if n < 100:
        raise typer.BadParameter("at least 100 rows", param_hint="--n")
    repo = Path(write.__file__).resolve().parents[3]
    result = write.run(n, batch, repeats, baseline, repo, log=console.print)
    print(write.render(result))
    console.print(f"result: {write.save(result, out)}")
    if any(r["verify_drift"] for r in result["contenders"].values()):
        console.print("[red]verify found drift[/]")
        raise typer.Exit(1)


@bench_app.command("scale")
def bench_scale(
    rows: Annotated[
        int, typer.Option(help="rows the write path backfills (random unit vectors instead of the model)")
    ] = 50_000,
    model_rows: Annotated[
        int, typer.Option(help="rows the real model backfills (it embeds ~20 rows/s on 2 cores)")
    ] = 2_000,
    embedders: Annotated[list[int] | None, typer.Option("--embedders", help="embedder processes per run")] = None,
    rate: Annotated[
        float, typer.Option(help="changes/s written (and probed for freshness) during each backfill")
    ] = 50.0,
    out: Annotated[Path, typer.Option(help="folder for the JSON and PNG")] = Path("bench/results"),
) -> None:
    """Backfill throughput of 1, 2 and 4 embedder processes against a 3-node Qdrant cluster (its own `up
    --cluster`, stopped at the end), with the real model and with random unit vectors (the write path alone), and
    freshness at `rate` changes/s during each backfill; side by side."""
    import signal

    from ragtide.bench import scale

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops its cluster
    report, path, png = scale.run(rows, model_rows, embedders or [1, 2, 4], rate, out, log=console.print)
    print(report.table())
    console.print(f"machine: {report.machine}\nresult: {path}" + (f", {png}" if png else ""))


@bench_app.command("query-wait")
def bench_query_wait(
    n: Annotated[int, typer.Option("--n", help="queries timed per contender")] = 40,
    batch: Annotated[int, typer.Option(help="texts per backfill batch (the embedder's default on a CPU)")] = 256,
    nice: Annotated[int, typer.Option(min=1, max=19, help="the writer's nice value in the last contender")] = 10,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
) -> None:
    """A query's embedding latency during a backfill: sharing the writer's engine (one lock: it waits for whole
    batches), an engine of its own, and an engine of its own while the writer's threads run at a lower priority
    (encoder.ingest_nice, what the node does), side by side (needs no running stack)."""
    from ragtide.bench import embed, save_result
    from ragtide.contracts.machine import cpu_info
    from ragtide.embedder.engine import EmbeddingEngine

    model = embed.default_model_dir()
    texts = embed.corpus(EmbeddingEngine(model, "cpu").tokenizer, 4 * batch)
    queries = [f"how do I {w} a file" for w in ("open", "read", "close", "lock", "copy", "move", "delete", "rename")]
    make = lambda nice: EmbeddingEngine(model, "cpu", nice=nice)  # noqa: E731
    result = embed.query_wait(make, texts, (queries * n)[:n], batch, nice)
    table = Table("query embedding during a backfill", "p50 ms", "p95 ms", "max ms", "backfill chunks/s")
    for name, r in result.items():
        table.add_row(name, str(r["p50_ms"]), str(r["p95_ms"]), str(r["max_ms"]), str(r["backfill_chunks_s"]))
    console.print(table)
    machine = cpu_info()
    console.print(f"machine: {machine}")
    saved = {"machine": machine, "queries": n, "batch": batch, "contenders": result}
    console.print(f"result: {save_result(saved, out, 'query-wait')}")


@bench_app.command("serve")
def bench_serve(
    duration: Annotated[float, typer.Option(min=1, max=300, help="seconds per search phase")] = 10.0,
    clients: Annotated[int, typer.Option(min=2, max=64, help="concurrent clients of the second search phase")] = 8,
    answers: Annotated[int, typer.Option(min=0, max=200, help="streamed answers (0: skip)")] = 5,
    max_tokens: Annotated[int, typer.Option(min=1, max=1024, help="completion length of each answer")] = 32,
    key: Annotated[str | None, typer.Option(help="API key (default: none, which dev mode allows)")] = None,
    grow_to: Annotated[
        int | None,
        typer.Option(min=1, max=2_000_000, help="first insert synthetic rows until the index holds this many chunks"),
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
    backfill_to: Annotated[
        int | None,
        typer.Option(min=1, max=2_000_000, help="search with 1 client while a backfill grows the index to this many"),
    ] = None,
    connections: Annotated[
        list[int] | None, typer.Option("--connections", help="wrk load levels (default 64, 256, 1024)")
    ] = None,
    sweep: Annotated[
        list[int] | None, typer.Option("--sweep", help="smaller levels, for the best QPS at p99 ≤ 200 ms")
    ] = None,
    level_s: Annotated[float, typer.Option(min=1, max=120, help="seconds per wrk level")] = 15.0,
    baseline: Annotated[
        str | None, typer.Option(help="also run the node of this git revision over the same data, side by side")
    ] = None,
    load: Annotated[bool, typer.Option(help="run the wrk levels (needs wrk)")] = True,
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=5,
            help="wrk's levels per contender, in turn, each on a freshly started node; the best round counts "
            "(default: 2 with --baseline, else 1)",
        ),
    ] = None,
) -> None:
    """Search latency with 1 client and the QPS N clients hold, then TTFT of streamed answers; then wrk: a sweep of
    small levels, 64, 256 and 1,024 connections, and 1 right after, for this code and, with --baseline, another
    revision's node, side by side (in turns: this, the baseline, this, the baseline)."""
    from ragtide.bench.serve import ServePlan, run

    s = current_settings()
    plan = ServePlan(
        duration_s=duration,
        clients=clients,
        answers=answers,
        max_tokens=max_tokens,
        key=key,
        grow_to=grow_to,
        backfill_to=backfill_to,
        level_s=level_s,
        baseline=baseline,
        rounds=rounds or (2 if baseline else 1),
        load=load,
    )
    plan.connections, plan.sweep = connections or plan.connections, sweep or plan.sweep
    with console.status("") as status:
        result = run(s, loopback_api(s), plan, status.update)
    phases = result.phases
    table = Table(
        "phase",
        "requests",
        "errors",
        "QPS",
        "p50",
        "p95",
        "p99",
        "server p50",
        "TTFT p50",
        "TTFT p95",
        "tokens/s",
        title=f"bench serve: {result.api}, {result.indexed_chunks} indexed chunks",
    )
    for p in phases:
        lat, ttft = p.latency_ms, p.extra.get("ttft_ms", {})
        tps = p.extra.get("tokens_per_s", {}).get("p50")
        table.add_row(
            p.name,
            str(p.requests),
            str(p.errors),
            f"{p.qps:g}",
            *(f"{lat.get(q)} ms" for q in ("p50", "p95", "p99")),
            f"{p.server_ms.get('p50', '–')} ms" if p.server_ms else "–",
            f"{ttft.get('p50')} ms" if ttft else "–",
            f"{ttft.get('p95')} ms" if ttft else "–",
            f"{tps:.0f}" if tps else "–",
        )
    Console(width=200).print(table)
    for name, measured in result.load.items():
        lv = Table(
            "connections",
            "QPS (200s)",
            "p50",
            "p95",
            "p99",
            "shed 503",
            "timeouts",
            "socket errors",
            title=f"{name}, round {measured['round']}",
        )
        after = [{**row, "connections": f"{row['connections']} (right after)"} for row in measured["after_overload"]]
        for row in measured["sweep"] + measured["levels"] + after:
            lv.add_row(
                str(row["connections"]),
                f"{row['qps']:g}",
                *(f"{row[q]} ms" for q in ("p50_ms", "p95_ms", "p99_ms")),
                str(row["shed"]),
                str(row["timeouts"]),
                str(row["socket_errors"]),
            )
        Console(width=200).print(lv)
        each = ", ".join(f"{q:g}" for q in measured["rounds_best_qps"])
        print(
            f"{name}: best QPS with p99 ≤ 200 ms and nothing shed: {measured['best_qps_p99_200ms']:g} "
            f"(round {measured['round']} above; each round: {each})"
        )
    if result.limits:
        lim = result.limits
        print(f"limits: a {lim['rate_per_s']:g}/s key under 16 connections: {lim['ok']} ok, {lim['limited']} 429s")
    console.print(f"result: {result.save(out)}")


@bench_app.command("cache")
def bench_cache(
    k: Annotated[int, typer.Option(min=1, max=20, help="chunks per answer")] = 3,
    max_tokens: Annotated[int, typer.Option(min=1, max=256, help="completion length of each answer")] = 16,
    stale_rows: Annotated[int, typer.Option(min=0, max=50, help="rows changed after their answer was cached")] = 5,
    out: Annotated[Path, typer.Option(help="folder for the JSON result")] = Path("bench/results"),
) -> None:
    """Replay paraphrased questions: hit rate, wrong-hit rate, latency hit vs miss, and stale hits after a
    cited row changed, in one run (against the running stack)."""
    from ragtide.bench.cache import replay

    s = current_settings()
    api = loopback_api(s)
    with console.status("replaying questions…"):
        bench = replay(api, s.postgres.dsn(), k, max_tokens, stale_rows, s.gateway.admin_headers(), log=console.print)
    bench.threshold = s.cache.threshold
    summary = bench.summary()
    table = Table(
        "", "hit", "miss", title=f"bench cache: {summary['questions']} questions, threshold {s.cache.threshold}"
    )
    table.add_row("p50", f"{summary['hit_ms']['p50']} ms", f"{summary['miss_ms']['p50']} ms")
    table.add_row("p99", f"{summary['hit_ms']['p99']} ms", f"{summary['miss_ms']['p99']} ms")
    table.add_row("count", str(summary["hit_ms"]["count"]), str(summary["miss_ms"]["count"]))
    for q in ("p50", "p99"):
        table.add_row(f"server {q}", f"{summary['hit_server_ms'][q]} ms", f"{summary['miss_server_ms'][q]} ms")
    Console(width=160).print(table)
    kinds = ", ".join(f"{kind} {v['hits']}/{v['asked']}" for kind, v in summary["by_kind"].items())
    print(f"hit rate {summary['hit_rate']} ({kinds})")
    print(f"wrong hits {summary['wrong_hits']} (rate {summary['wrong_hit_rate']})")
    print(f"stale hits after a cited row changed: {summary['stale_hits']} of {summary['stale_checks']} checks")
    console.print(f"result: {bench.save(out)}")


@bench_app.command("freshness")
def bench_freshness(
    rate: Annotated[list[float], typer.Option(help="changes per second; repeat for a side-by-side run")] = [5.0, 50.0],  # noqa: B006
    duration: Annotated[float, typer.Option(help="seconds of load per rate")] = 30.0,
    mix: Annotated[str, typer.Option(help="update:insert:meta:delete weights")] = "50:20:15:15",
    find_max: Annotated[bool, typer.Option(help="also step up the rate until lag grows")] = False,
    out: Annotated[Path, typer.Option(help="folder for the JSON result and the PNG plot")] = Path("bench/results"),
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="run the rates once per encoder precision (fp32, fp16, bf16, int8; repeat for a side-by-side run): "
            "the node is restarted with it, its index rebuilt in that precision first, and restarted as configured "
            "after (rebuilding back in the background); one-node stack only, not under `up --supervise`"
        ),
    ] = None,
) -> None:
    """Commit -> searchable under a steady write load from a separate process: p50/p95/p99/max, per stage."""

    from ragtide.bench import save_result
    from ragtide.bench.freshness import TARGETS, plot, sweep
    from ragtide.bench.workload import parse_mix
    from ragtide.contracts.machine import cpu_info

    s = current_settings()
    machine = cpu_info()
    console.print(f"machine: {machine['model']}, {machine['cpus']} CPUs, features {' '.join(machine['features'])}")
    try:
        weights = parse_mix(mix)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mix") from exc
    if any(per_s <= 0 or per_s > 1000 for per_s in rate):
        raise typer.BadParameter("rates must be in (0, 1000]", param_hint="--rate")
    if any(d not in ("fp32", "fp16", "bf16", "int8") for d in dtype or []):
        raise typer.BadParameter("one of fp32, fp16, bf16, int8", param_hint="--dtype")
    if dtype and find_max:
        raise typer.BadParameter("--find-max runs with the node as configured, without --dtype", param_hint="--dtype")
    if dtype and s.encoder.backend != "engine":
        raise typer.BadParameter(f"needs encoder.backend: engine (not {s.encoder.backend})", param_hint="--dtype")
    if dtype and s.data_dir != configured_settings().data_dir:  # `current_settings()` gave the cluster's
        raise typer.BadParameter("restarts the one-node stack's node; not with `up --cluster`", param_hint="--dtype")
    with console.status("") as status:
        results, max_sustained = sweep(s, rate, duration, weights, dtype or [], find_max, status.update, console.print)
    table = Table(
        *(["encoder.dtype"] if dtype else []),
        "rate (/s)",
        "achieved",
        "changes",
        "p50",
        "p95",
        "p99",
        "max",
        "canary p50",
        "target p50/p99",
        "sustained",
        title="commit -> searchable (seconds)",
    )
    for r in results:
        e = r.end_to_end
        tgt = TARGETS.get(r.rate)
        target = f"{tgt[0]}/{tgt[1]} {'[green]met[/]' if r.meets_target() else '[red]missed[/]'}" if tgt else "-"
        table.add_row(
            *([r.node] if dtype else []),
            f"{r.rate:g}",
            f"{r.achieved_per_s:g}",
            str(e["count"]),
            _s(e["p50"]),
            _s(e["p95"]),
            _s(e["p99"]),
            _s(e["max"]),
            _s(r.canary["p50"]),
            target,
            "yes" if r.sustained else "[red]no[/]",
        )
    console.print(table)
    stages = Table(
        "stage", *(f"{r.node} {r.rate:g}/s p50 · p95".lstrip() for r in results), title="where the time goes"
    )
    for stage in results[0].stages:
        stages.add_row(stage, *(f"{_s(r.stages[stage]['p50'])} · {_s(r.stages[stage]['p95'])}" for r in results))
    console.print(stages)
    if max_sustained is not None:
        console.print(f"largest sustained rate tried: {max_sustained:g} changes/s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = {
        "machine": machine,
        "mix": weights,
        "duration_s": duration,
        "max_sustained": max_sustained,
        "results": [r.as_dict() for r in results],
    }
    result_file = save_result(summary, out, "freshness", stamp)
    png = plot(results, out / f"freshness-{stamp}.png")
    console.print(f"wrote {result_file}" + (f" and {png}" if png else " (install matplotlib for the plot)"))


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
