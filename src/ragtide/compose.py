"""The composition roots of the long-running processes, one each, built from the building blocks defined above them
(`build_encoder`, `open_generations`, `build_embedder`, `build_lifecycle`, ...):

- `create_node_app`: `ragtide node`, the embedder and the retrieval API in one process over the embedded index;
- `create_embedder` (run by `run_embedder`): `ragtide embedder`, one of N over a Qdrant server;
- `create_retriever_app`: `ragtide retriever`, one of M over a Qdrant server;
- `create_embeddings_app`: `ragtide serve-embeddings`, this machine's encoder as an embeddings API.

The CLI only parses arguments and calls them (`serve`, `run_embedder`). The embedded Qdrant engine is single-process,
so in embedded mode one process, the *node*, owns it: it runs the Faust embedder and the retrieval API on one event
loop (uvicorn drives, Faust starts from the API's lifespan). With QDRANT_URL set, `ragtide embedder` and `ragtide
retriever` run as separate processes that scale independently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import faust
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.freshness import FreshnessTracker
from ragtide.contracts.logging import BackgroundFailures, setup_logging
from ragtide.contracts.machine import keep_stderr_at_exit
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder.chunking import Chunker, token_offsets
from ragtide.embedder.encoder import (
    Encoder,
    RandomUnitEncoder,
    SentenceTransformerEncoder,
    default_model_path,
    model_name_of,
    model_prompts,
    resolve_device,
    with_query_prefix,
)
from ragtide.embedder.generations import (
    BuildWatcher,
    Catalog,
    CatalogFollower,
    Generation,
    GenerationFactory,
    Generations,
    GenerationSpec,
    SearchEncoders,
    encoder_identity,
    verifier,
)
from ragtide.embedder.index.factory import open_index
from ragtide.embedder.lease import Leadership, Lease, LocalLease, LocalLeases, PostgresLease
from ragtide.embedder.liveness import Watchdog, health_app, serve_health
from ragtide.embedder.metrics import EmbedderMetrics
from ragtide.embedder.progress import BackfillMonitor, counts_by_table
from ragtide.embedder.truncations import PostgresTruncateLog, TruncateLog
from ragtide.embedder.worker import BatchProcessor, create_worker_app
from ragtide.embedder.writer import IndexWriter
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import PostgresGatewayStore
from ragtide.ingest.connector import ensure_topics, signal_snapshots, source_topics
from ragtide.ingest.sources import SourcesConfig, dsn_of, sources_of
from ragtide.retriever.admin import admin_router
from ragtide.retriever.app import create_app
from ragtide.retriever.cache import InvalidatingApplier, SemanticCache, build_cache
from ragtide.retriever.forward import admin_proxy

log = logging.getLogger(__name__)


def build_encoder(
    settings: RagtideSettings,
    spec: GenerationSpec | None = None,
    registry: CollectorRegistry | None = None,
    queries: bool = False,
    nice: int = 0,
    threads: int | None = None,
    precision: str | None = None,
) -> Encoder:
    """The configured encoder, or the one an older generation `spec` needs: its model, precision and provider
    ("local": a model in this process, whatever encoder.backend now says; else the embeddings API at the URL it
    was built from, with the configured key and limits). `registry` gets a provider's metrics. `queries`: an
    encoder for search alone, so a provider's faults get one quick retry, never a long wait (a search waiting on
    Retry-After would hold the query path; it answers 503 with Retry-After instead). `nice`: the local engine's
    threads run at that nice value (see encoder.ingest_nice); `threads`: its forward passes' intra-op team (see
    encoder.query_threads); `precision`: the configured encoder's, where the index decides it (`kept_precision`).
    """
    e = settings.encoder
    path = (Path(spec.model_path) if spec.model_path else default_model_path()) if spec else e.model_path
    precision = spec.precision if spec else precision
    backend = e.backend
    if spec is not None:
        backend = "openai" if spec.provider != "local" else "engine" if backend == "openai" else backend
    if backend == "openai":
        from ragtide.embedder.provider import PROVIDER_PREFIX, OpenAIEmbeddingsEncoder, provider_name

        if e.backend == "openai" and e.dtype == "int8":
            raise ConfigError("encoder.dtype: int8 is the local engine's; an embeddings provider makes its own vectors")
        api = e.api
        if spec is not None:  # the generation's own model and provider
            same = spec.provider == provider_name(e.api) and e.api.url
            # The configured provider at its configured address (it may have moved), with its key; another one at
            # the address it was built from, without the configured key (never sent to another host).
            url = e.api.url if same else spec.url
            if not url:
                raise ConfigError(f"encoder.api.url: generation {spec.fingerprint} needs {spec.provider}; set it")
            name = spec.provider.removeprefix(PROVIDER_PREFIX)
            update: dict[str, object] = {"model": spec.model, "dim": spec.dim, "url": url, "provider": name}
            if not same:  # another provider: its key by its name, its requests shaped as when it was built
                update["api_key"] = e.api.keys.get(name)
                update |= {k: getattr(spec, k) for k in GenerationSpec.REQUEST_SHAPE}
            api = api.model_copy(update=update)
        if queries:
            quick = {"retries": min(api.retries, 1), "max_retry_after_s": 0.5, "give_up_s": min(api.give_up_s, 2.0)}
            api = api.model_copy(update=quick)
        return OpenAIEmbeddingsEncoder(api, registry)
    if e.dtype == "int8" and backend != "engine":
        raise ConfigError(f"encoder.dtype: int8 needs encoder.backend: engine (the {backend} backend is float only)")
    if backend == "sentence-transformers":
        return SentenceTransformerEncoder(path, e.device, e.batch_size)
    if backend == "random-unit":
        return RandomUnitEncoder(path)
    from ragtide.embedder.engine import EmbeddingEngine, choose_dtype, int8_gated

    # int8 runs on the CPU (ONNX Runtime's kernels): an int8 generation is served there on a GPU machine too.
    # The generation's precision, the configured dtype, the device and the model decide whether it is int8 (auto
    # picks int8 only on a CPU-only machine, for the packaged model); an int8 engine then runs on the CPU, whatever
    # encoder.device says.
    chosen, why = choose_dtype(e.dtype, resolve_device(e.device) == "cuda", precision, gated=int8_gated(path))
    int8 = chosen == "int8"
    engine = EmbeddingEngine(
        path or default_model_path(),
        "cpu" if int8 else e.device,
        "int8" if int8 else e.query_dtype if queries and e.query_dtype != "auto" else e.dtype,
        e.token_budget,
        tokenizer=e.tokenizer,
        precision=precision,
        nice=nice,
        threads=threads,
        queries=queries,
    )
    log.info(
        "embedding engine loaded",
        extra={
            "model": engine.model_name,
            "device": str(engine.device),
            "dtype": engine.dtype_name,
            "dtype_why": why if int8 else engine.dtype_why,
            "window": engine.max_seq,
            "token_budget": engine.token_budget,
            "threads": threads or "torch's default",
            "tokenizer": engine.text_tokenizer.backend,
            "why_not_flash": engine.text_tokenizer.why_not_flash or None,
        },
    )
    return engine


def prompts(settings: RagtideSettings, encoder: Encoder) -> tuple[str, str]:
    """The (query, document) prompts: encoder.query_prefix / document_prefix where set, else the local model
    folder's (config_sentence_transformers.json), else none."""
    e = settings.encoder
    folder = ("", "")
    if encoder.provider == "local" and (e.query_prefix is None or e.document_prefix is None):
        folder = model_prompts(configured_model(settings))
    query = e.query_prefix if e.query_prefix is not None else folder[0]
    document = e.document_prefix if e.document_prefix is not None else folder[1]
    return query, document


def desired_generation(settings: RagtideSettings, encoder: Encoder) -> GenerationSpec:
    """The generation the configuration asks for (a document prompt's tokens come off the chunk window)."""
    query, document = prompts(settings, encoder)
    prompt_tokens = len(token_offsets(encoder.tokenizer, document)) if document else 0
    if encoder.max_tokens - prompt_tokens < 16:
        raise ConfigError(
            f"encoder.document_prefix: its {prompt_tokens} tokens leave {encoder.max_tokens - prompt_tokens} of "
            f"{encoder.model_name}'s {encoder.max_tokens}-token window for the text; shorten it"
        )
    return GenerationSpec(
        model=encoder.model_name,
        dim=encoder.dim,
        max_tokens=min(settings.chunking.max_tokens, encoder.max_tokens - prompt_tokens),
        overlap=settings.chunking.overlap_tokens,
        model_path=str(settings.encoder.model_path) if settings.encoder.model_path else None,
        precision=encoder.precision,
        provider=encoder.provider,
        url=settings.encoder.api.url if encoder.provider != "local" else None,
        query_prefix=query,
        document_prefix=document,
        **(provider_requests(settings) if encoder.provider != "local" else {}),
    )


def provider_requests(settings: RagtideSettings) -> dict[str, Any]:
    """How the configured provider's requests are shaped, kept with its generations (`GenerationSpec`)."""
    return {k: getattr(settings.encoder.api, k) for k in GenerationSpec.REQUEST_SHAPE}


def node_query_encoder(
    settings: RagtideSettings,
    registry: CollectorRegistry,
    spec: GenerationSpec | None = None,
    precision: str | None = None,
) -> Encoder:
    """Search's own encoder in the node, beside the writer's: its engine's passes run with a team of
    encoder.query_threads. `precision`: the writer's, for the configured model (its queries must match)."""
    return build_encoder(
        settings, spec, registry, queries=True, threads=settings.encoder.query_threads, precision=precision
    )


def auto_precision(settings: RagtideSettings) -> bool:
    """Whether the index decides the local engine's precision: encoder.dtype is auto (`kept_precision`)."""
    return settings.encoder.dtype == "auto" and settings.encoder.backend == "engine"


def kept_precision(settings: RagtideSettings, catalog: Catalog, new: str | None = None) -> str | None:
    """The precision the configured engine takes from the index where encoder.dtype is auto: the live
    generation's, when it is the local engine's (auto's pick differs by CPU; a leader keeps it too:
    `Generations(keep_precision=...)`); `new` for a new index (None: the CPU's pick, where one process makes and
    reads the index: the node; "float" where processes on several machines may each pick, before any of them
    wrote the catalog). None too where a precision is configured (the engine's own choice)."""
    if not auto_precision(settings):
        return None
    live = catalog.read().live
    if live is None or live.provider != "local" or live.model != model_name_of(configured_model(settings)):
        return new  # a new index, or one of another model (its precision was decided for that model)
    return live.precision


def configured_model(settings: RagtideSettings) -> Path:
    """The local model folder encoder.model_path names, else the packaged one."""
    return settings.encoder.model_path or default_model_path()


def spares_the_cpu(encoder: Encoder) -> bool:
    """Whether the encoder leaves this process' cores to the writer: an engine on CUDA, or free vectors (the
    writer then chunks in a thread while it writes: `IndexWriter.pipeline`)."""
    return isinstance(encoder, RandomUnitEncoder) or getattr(encoder, "cuda", False) is True


def generation_factory(
    settings: RagtideSettings,
    encoder: Encoder,
    sources: SourcesConfig,
    truncations: TruncateLog | None = None,
    registry: CollectorRegistry | None = None,
    queries: bool = False,
    nice: int = 0,
) -> GenerationFactory:
    """Opens a generation's collection with an encoder of its model (loaded once per provider, model and
    precision) and its chunking; its writer shares the group's truncate log (the writing side only: a reader never
    applies events)."""
    encoders = {encoder_identity(encoder): encoder}

    def make(spec: GenerationSpec) -> Generation:
        enc = encoders.get(spec.encoder_identity)
        if enc is None:
            enc = build_encoder(settings, spec, registry, queries, nice)
            if enc.model_name != spec.model or enc.dim != spec.dim or enc.provider != spec.provider:
                field = "encoder.model_path" if spec.provider == "local" else "encoder.api.provider"
                raise ConfigError(
                    f"{field}: generation {spec.fingerprint} needs {spec.model} (dim {spec.dim}, {spec.provider}) "
                    f"but {spec.model_path or spec.url or 'the default model'} is {enc.model_name} (dim {enc.dim}, "
                    f"{enc.provider})"
                )
            if enc.precision != spec.precision:
                raise ConfigError(
                    f"encoder.backend: generation {spec.fingerprint} holds {spec.precision} vectors, which the "
                    f"{settings.encoder.backend} backend cannot make (set encoder.backend: engine)"
                )
            encoders[spec.encoder_identity] = enc
        index = open_index(settings, spec.collection(settings.index.collection))
        chunker = Chunker(enc.tokenizer, spec.max_tokens, spec.overlap, settings.encoder.tokenizer)
        price = settings.encoder.api.usd_per_million_tokens if enc.provider != "local" else 0.0
        writer = IndexWriter(
            index,
            enc,
            chunker,
            sources,
            truncations=truncations,
            pipeline=spares_the_cpu(enc),
            usd_per_million_tokens=price,
            document_prefix=spec.document_prefix,
        )
        return Generation(spec, index, with_query_prefix(enc, spec.query_prefix), writer)

    return make


def open_catalog(settings: RagtideSettings) -> Catalog:
    """The alias of the configured collection, in the same store."""
    return Catalog(open_index(settings, f"{settings.index.collection}-catalog"))


def open_generations(
    settings: RagtideSettings,
    encoder: Encoder,
    sources: SourcesConfig,
    registry: CollectorRegistry,
    query_encoder: Encoder | None = None,
    nice: int = 0,
    catalog: Catalog | None = None,
) -> Generations:
    """The generations as the catalog names them, followed (nothing written): the process leads only once it holds
    the lease (`build_lifecycle`), and then converges them on the configuration. `query_encoder`: search's own
    instance of the configured model (the node's); a generation of another model (a migration) gets one of its own
    too, loaded once when search first reads it: never the writer's, whose lock holds whole batches and whose
    threads run at `nice`. `catalog`: the one the root already opened (`kept_precision`)."""
    base = settings.index.collection
    gens = Generations(
        catalog or open_catalog(settings),
        generation_factory(
            settings, encoder, sources, PostgresTruncateLog(settings.postgres.state()), registry, nice=nice
        ),
        registry,
        drop_collection=lambda spec: open_index(settings, spec.collection(base)).drop(),
        grace_s=settings.index.retire_grace_s,
        query_encoder=None
        if query_encoder is None
        else SearchEncoders(query_encoder, lambda spec: node_query_encoder(settings, registry, spec)),
        keep_precision=auto_precision(settings),
    )
    gens.leading = False
    gens.follow(desired_generation(settings, encoder))
    return gens


def embedder_lease(settings: RagtideSettings) -> PostgresLease:
    """The lease the embedders of one index share, in ragtide's state database, advertising this process."""
    return PostgresLease(settings.postgres.state(), f"embedder:{settings.index.collection}", settings.api.reach_url)


def build_embedder(
    settings: RagtideSettings,
    generations: Generations,
    sources: SourcesConfig,
    registry: CollectorRegistry,
    tracker: FreshnessTracker | None = None,
    cache: SemanticCache | None = None,
) -> tuple[faust.App, Watchdog]:
    """The Faust app of the embedder, writing to every open generation (and invalidating cached answers), and the
    watchdog that checks its progress against Kafka's offsets (its verdict is the process' /healthz)."""
    applier = InvalidatingApplier(generations, cache) if cache is not None else generations
    processor = BatchProcessor(applier, EmbedderMetrics(registry), settings.connect.topic_prefix, tracker)
    on_gpu = bool(getattr(generations.live.encoder, "cuda", False))  # the engine on CUDA takes bigger batches
    watchdog = Watchdog(settings.batch.stall_s, settings.batch.degraded_after_s)
    return create_worker_app(settings, processor, source_topics(settings, sources), on_gpu, watchdog), watchdog


@contextlib.asynccontextmanager
async def build_lifecycle(
    settings: RagtideSettings,
    generations: Generations,
    sources: SourcesConfig,
    registry: CollectorRegistry,
    lease: Lease,
    desired: GenerationSpec,
) -> AsyncIterator[Leadership]:
    """While the embedder runs: hold or wait for the lease; the leader converges the generations on the
    configuration (asking Debezium for the rows a new build needs), switches a build live once verified, reaps
    retired collections and exports backfill progress (rows done / total, rate, ETA per table)."""
    dsn = dsn_of(settings, sources)
    failures = BackgroundFailures.of(registry)
    generations.lease = lease  # every catalog write and drop confirms it first, and writes in its term
    watcher = BuildWatcher(generations, sources, verifier(dsn, generations, sources), failures=failures)
    monitor = BackfillMonitor(
        generations,
        lambda: sources.user_tables,
        lambda tables: counts_by_table(dsn, sources, tables),
        registry,
        failures=failures,
    )

    async def become() -> None:
        generations.leading = True
        try:
            snapshot = await asyncio.to_thread(generations.converge, desired)
        except BaseException:
            generations.resign()
            raise
        if snapshot:  # a read-only source database is left out: the stall repair reads its rows instead
            try:
                await asyncio.to_thread(signal_snapshots, settings, sources, sources.user_tables)
            except Exception as exc:  # the watcher's stall repair fills the build from Postgres instead
                log.warning("could not signal the incremental snapshot", extra={"error": repr(exc)})

    leadership = Leadership(lease, become, [watcher.run, monitor.run], generations.resign, settings.index.lease_renew_s)
    await leadership.step()  # a sole or first embedder leads before its first batch
    task = asyncio.create_task(leadership.run())
    try:
        yield leadership
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_node_app(settings: RagtideSettings) -> FastAPI:
    """Embedder + retrieval API in one process, sharing the encoder and the (embedded) index."""
    from faust.contrib.asgi import faust_lifespan

    sources = sources_of(settings)
    registry = CollectorRegistry()
    # Search embeds with an engine of its own: the writer's runs a whole batch (256 events on a CPU, 4,096 on
    # CUDA) under its lock, and a query queued behind it waited for all of it. On shared cores the writer's threads
    # run at a lower priority (encoder.ingest_nice), so a query's pass goes first during a backfill.
    nice = settings.encoder.ingest_nice
    catalog = open_catalog(settings)
    encoder = build_encoder(settings, registry=registry, nice=nice, precision=kept_precision(settings, catalog))
    queries = node_query_encoder(settings, registry, precision=encoder.precision)
    tracker = FreshnessTracker(registry)
    generations = open_generations(settings, encoder, sources, registry, queries, nice, catalog)
    cache = build_cache(settings, registry, encoder.dim)
    worker, watchdog = build_embedder(settings, generations, sources, registry, tracker, cache)
    lease = LocalLease(LocalLeases(), "node", settings.api.url)  # the node is the only writer of its embedded index

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(settings, source_topics(settings, sources))  # before the consumer subscribes
        desired = desired_generation(settings, encoder)
        async with (
            build_lifecycle(settings, generations, sources, registry, lease, desired),
            faust_lifespan(worker)(app),
        ):
            yield

    admin = admin_router(settings, generations, sources, lease, cache)
    return create_app(
        settings,
        generations,
        None,
        sources,
        registry,
        lifespan=lifespan,
        tracker=tracker,
        routers=[admin],
        status=generations.status,
        cache=cache,
        health=watchdog.verdict,
    )


def create_retriever_app(settings: RagtideSettings) -> FastAPI:
    """The retrieval API alone; it reads a Qdrant server that the embedder writes."""
    if not settings.qdrant_url:
        raise ConfigError(
            "QDRANT_URL: the standalone retriever needs a Qdrant server; in embedded mode run `ragtide node`"
        )
    sources = sources_of(settings)
    registry = CollectorRegistry()
    catalog = open_catalog(settings)
    # A reader: it only embeds queries.
    new = "float"  # on a new index: the embedders' pick, whatever this machine's CPU is (`kept_precision`)
    encoder = build_encoder(settings, registry=registry, queries=True, precision=kept_precision(settings, catalog, new))
    follower = CatalogFollower(
        catalog,
        generation_factory(settings, encoder, sources, registry=registry, queries=True),
        desired_generation(settings, encoder),
        failures=BackgroundFailures.of(registry),
    )
    cache = build_cache(settings, registry, encoder.dim, sole_writer=False)
    forward = admin_proxy(embedder_lease(settings).leader)  # a reader of the lease: it never holds it
    return create_app(settings, follower, None, sources, registry, cache=cache, routers=[forward])


def create_embeddings_app(settings: RagtideSettings) -> FastAPI:
    """`ragtide serve-embeddings`: this machine's encoder (a GPU box's, say) as an OpenAI-compatible embeddings
    API for other deployments, which point `encoder.backend: openai` at it. The retrieval API over an index of its
    own that nothing writes: /v1/embeddings, /v1/models, the gateway's keys and limits, admission and
    micro-batching, /metrics; its search has nothing to find. No canary or slot checks: it has no source."""
    from ragtide.embedder.index.edge import EdgeIndex

    registry = CollectorRegistry()
    # Its vectors go into other deployments' float generations (a provider's are float): auto keeps them float.
    float_ = "float" if auto_precision(settings) else None
    encoder = build_encoder(settings, registry=registry, precision=float_)
    if encoder.provider != "local":
        raise ConfigError("encoder.backend: serve-embeddings serves a model of this machine, not another provider")
    index = EdgeIndex(settings.data_dir / "embeddings-server", "embeddings", settings.index.min_free_mb << 20)
    # Document chunks, not queries: a chunk of 510 tokens is longer than a query may be, and a pipeline's bulk
    # requests wait longer than a search would (its own retries cover what admission still turns away).
    api = settings.api
    alone = settings.model_copy(
        update={
            "canary": settings.canary.model_copy(update={"enabled": False}),
            "connect": settings.connect.model_copy(update={"slot_check_s": 0}),
            "api": api.model_copy(
                update={
                    "max_query_chars": max(api.max_query_chars, 100_000),
                    "max_embedding_inputs": max(api.max_embedding_inputs, 2048),
                    "queue_timeout_s": max(api.queue_timeout_s, 15.0),  # below its clients' timeout (30 s)
                    "query_batch": max(api.query_batch, 256),
                }
            ),
        }
    )
    return create_app(alone, index, encoder, sources_of(settings), registry)


def create_embedder(settings: RagtideSettings) -> tuple[faust.App, FastAPI]:
    """The standalone embedder (with a Qdrant server, one of N in a consumer group): its Faust worker, and its HTTP
    API (/healthz, /metrics, and, while it leads, the admin endpoints the retrievers forward)."""
    sources = sources_of(settings)
    registry = CollectorRegistry()
    tracker = FreshnessTracker(registry)
    catalog = open_catalog(settings)
    # One of N, maybe on other CPUs: a new index is float under auto (`kept_precision`), not each one's own pick.
    encoder = build_encoder(settings, registry=registry, precision=kept_precision(settings, catalog, "float"))
    generations = open_generations(settings, encoder, sources, registry, catalog=catalog)
    cache = build_cache(settings, registry, encoder.dim, sole_writer=False)  # the retrievers store, we invalidate
    worker, watchdog = build_embedder(settings, generations, sources, registry, tracker, cache)
    lease = embedder_lease(settings)
    desired = desired_generation(settings, encoder)

    @worker.task  # type: ignore[untyped-decorator]
    async def lead() -> None:
        async with build_lifecycle(settings, generations, sources, registry, lease, desired):
            await asyncio.Event().wait()

    gateway = Gateway(settings.gateway, PostgresGatewayStore(settings.postgres.state()), registry=registry)
    routers = [admin_router(settings, generations, sources, lease, cache)]
    return worker, health_app(registry, watchdog, routers, gateway)


def serve(build: Callable[[RagtideSettings], FastAPI], settings: RagtideSettings) -> None:
    """Run one of the HTTP processes (`create_node_app`, `create_retriever_app`, `create_embeddings_app`) on
    api.host:api.port until it is stopped."""
    import uvicorn

    keep_stderr_at_exit()
    setup_logging(settings.log_level, settings.json_logs)
    # httptools (C) parses HTTP: under a flood of searches the answers, shed ones included, were bound by h11's
    # pure-Python parsing on the one event loop (1.9x the shed rate here). The loop stays asyncio's: uvloop shed
    # faster on average but left some connections unanswered for seconds (docs/serving.md).
    uvicorn.run(
        build(settings),
        host=settings.api.host,
        port=settings.api.port,
        http="httptools",
        loop="asyncio",
        log_config=None,
        access_log=False,
    )


def run_embedder(settings: RagtideSettings) -> None:
    """Run one standalone embedder until it is stopped: its topics exist before its consumer subscribes; its HTTP
    API runs on a thread of its own (the worker's event loop stays free); Faust's worker owns the main thread."""
    keep_stderr_at_exit()  # its stderr is its log, to the last line
    setup_logging(settings.log_level, settings.json_logs)
    worker, api = create_embedder(settings)
    asyncio.run(ensure_topics(settings, source_topics(settings, sources_of(settings))))
    serve_health(api, settings.api.host, settings.api.port)
    faust.Worker(worker, loglevel=settings.log_level).execute_from_commandline()
