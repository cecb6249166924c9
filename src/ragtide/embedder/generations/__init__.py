"""Index generations: blue/green collections behind one alias, so a model change or a full reindex never shows
search a half-built index.

A *generation* is everything that decides the vectors: the model, its dimension, the chunking, and a revision.
Each generation lives in its own collection `<collection>-<fingerprint>`. The *catalog* (one point in a small
collection of the same store, so it lives wherever the index lives) is the alias: it names the live generation
and the one being built.

While a build runs, the embedder applies every change to both generations (dual write); the new one receives the
existing rows through Debezium's incremental snapshot, which Debezium interleaves correctly with the live stream.
`BuildWatcher` verifies the new generation against the source; once there is no drift it becomes live in one
step (search switches its collection and its query encoder together) and the old collection is dropped.

Modules, in the order of the flow: `spec` (what a generation is), `catalog` (the alias), `dual` (the embedder's
live and building generations, written together), `switch` (when a build goes live), `follower` (the standalone
retriever's view of the catalog).
"""

from ragtide.embedder.generations.catalog import Catalog
from ragtide.embedder.generations.dual import Generations, LockedWriter, NotLeading
from ragtide.embedder.generations.follower import CatalogFollower
from ragtide.embedder.generations.spec import (
    Generation,
    GenerationFactory,
    GenerationSpec,
    SearchEncoders,
    encoder_identity,
)
from ragtide.embedder.generations.switch import BuildWatcher, verifier, verify_generation

__all__ = [
    "BuildWatcher",
    "Catalog",
    "CatalogFollower",
    "Generation",
    "GenerationFactory",
    "GenerationSpec",
    "Generations",
    "LockedWriter",
    "NotLeading",
    "SearchEncoders",
    "encoder_identity",
    "verifier",
    "verify_generation",
]
