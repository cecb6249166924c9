"""A running deployment switched from the local engine to an embeddings provider, on the real stack: the node is
restarted with `encoder.backend: openai` pointing at another ragtide process's `/v1/embeddings`
(`serve-embeddings`), rebuilds its index blue/green through the provider while search keeps answering from the
local generation, switches at zero drift, drops the old generation, and embeds both new changes and queries
through the provider. Then back to the local engine, the same way."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from ragtide.bench.freshness import node_with_encoder
from ragtide.contracts.settings import ProviderSettings
from tests.e2e.conftest import LiveStack, poll
from tests.e2e.test_reindex import admin, docs_rows
from tests.providers import MODEL, embeddings_server


def test_a_running_deployment_switches_to_a_provider_and_back_blue_green(live: LiveStack, tmp_path: Path) -> None:
    before = admin(live, "generations")["live"]
    assert before["provider"] == "local"
    rows = docs_rows(live)
    answered: list[int] = []

    def search_answers() -> None:  # during the rebuild: the live (local) generation, always complete
        answered.append(len(live.search("how do I rotate credentials", k=3)))
        assert docs_rows(live) >= rows

    with embeddings_server(tmp_path) as upstream:
        api = ProviderSettings(url=upstream, model=MODEL, concurrency=2)
        encoder = live.settings.encoder.model_copy(update={"backend": "openai", "api": api})

        def served(spec: dict[str, Any]) -> bool:
            return bool(spec["provider"].startswith("openai:127.0.0.1:"))

        with node_with_encoder(live.settings, encoder, served, "the provider's generation", 1200, search_answers):
            after = admin(live, "generations")["live"]
            assert after["model"] == MODEL and after["url"] == upstream
            assert after["fingerprint"] != before["fingerprint"] and answered and min(answered) == 3
            assert admin(live, "verify", {"repair": False})["drift"] == 0 and docs_rows(live) == rows
            old = live.settings.index_path / f"{live.settings.index.collection}-{before['fingerprint']}"
            poll(lambda: not old.exists(), "the local generation's collection to be dropped after its grace period")

            # A change now is embedded by the provider, and a query too (the live generation's encoder).
            marker = f"providermarker{uuid.uuid4().hex[:8]}"
            target, topic = live.sql("SELECT id, topic FROM public.docs ORDER BY id LIMIT 1")[0]
            story = f"An otter cartographer charts tidal libraries of seashell maps. {marker}"
            live.sql("UPDATE public.docs SET body = %s WHERE id = %s", (story, target))

            def found() -> bool:
                hits = live.search("otter cartographer tidal seashell maps", k=3, flt={"topic": topic})
                return any(marker in h["text"] for h in hits)

            poll(found, "the change to be searchable through the provider's generation")
            provider = after["provider"]
            assert live.metric("ragtide_provider_texts_total", provider=provider, model=MODEL) > rows
            assert live.metric("ragtide_embed_tokens_total", table="public.docs") > rows

        # As configured again: rebuilt locally, the provider still serving queries until the switch back.
        def local() -> dict[str, Any] | None:
            gens = admin(live, "generations")
            return gens if gens["live"]["provider"] == "local" and gens["building"] is None else None

        back = poll(local, "the local generation to be live again", timeout=1200)
        assert back["live"]["model"] == before["model"] and back["live"]["precision"] == before["precision"]
    assert admin(live, "verify", {"repair": False})["drift"] == 0
