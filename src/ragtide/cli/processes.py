"""The long-running processes; each is built by its composition root in `ragtide.compose`."""

from __future__ import annotations

from ragtide.cli.common import app, current_settings


@app.command()
def node() -> None:
    """Run the node: embedder + retrieval API in one process (owner of the embedded index)."""
    from ragtide.compose import create_node_app, serve

    serve(create_node_app, current_settings())


@app.command()
def retriever() -> None:
    """Run the retrieval API alone (needs QDRANT_URL)."""
    from ragtide.compose import create_retriever_app, serve

    serve(create_retriever_app, current_settings())


@app.command("serve-embeddings")
def serve_embeddings() -> None:
    """Serve this machine's embedding model as an OpenAI-compatible POST /v1/embeddings (for other deployments'
    `encoder.backend: openai`, e.g. one GPU box shared by several teams), on api.host:api.port."""
    from ragtide.compose import create_embeddings_app, serve

    serve(create_embeddings_app, current_settings())


@app.command()
def embedder() -> None:
    """Run one Faust embedder (with QDRANT_URL: one of N in the group; the one holding the lease leads builds);
    /healthz, /metrics and the leader's /v1/admin on the API port."""
    from ragtide.compose import run_embedder

    run_embedder(current_settings())
