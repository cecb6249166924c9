"""The embedding engine on the real model (CPU): parity with sentence-transformers, the ids path, determinism
across batch compositions, and edge inputs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import string
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ragtide.bench.embed import corpus, cosine_deviation
from ragtide.compose import build_encoder, desired_generation, node_query_encoder, prompts
from ragtide.contracts.events import ChangeEvent, Op, SourcePosition
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.embedder import engine as engine_module
from ragtide.embedder.chunking import Chunker
from ragtide.embedder.encoder import SentenceTransformerEncoder, default_model_path, with_query_prefix
from ragtide.embedder.engine import EmbeddingEngine, model_window, plan_batches
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.embedder.tokenize import FLASH_EXTRA, TextTokenizer, flash_contexts, probe_texts
from ragtide.embedder.writer import IndexWriter
from ragtide.ingest.sources import SourcesConfig

SOURCES = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddingEngine]:
    e = EmbeddingEngine(default_model_path(), device="cpu", dtype="fp32", token_budget=2048)
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(default_model_path(), "cpu", 64)


@pytest.fixture(scope="module")
def texts(engine: EmbeddingEngine) -> list[str]:
    return [*corpus(engine.tokenizer, 160), "résumé naïve café 🚀🔥 汉字", "x", "   leading and trailing   "]


def test_vectors_match_sentence_transformers(
    engine: EmbeddingEngine, reference: SentenceTransformerEncoder, texts: list[str]
) -> None:
    got, want = engine.encode(texts), reference.encode(texts)
    assert got.shape == want.shape == (len(texts), 384) and got.dtype == np.float32
    assert cosine_deviation(got, want) <= 1e-3  # the bar; fp32 on CPU is far inside it
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bf16_on_cpu_meets_the_parity_bar(reference: SentenceTransformerEncoder, texts: list[str]) -> None:
    bf16 = EmbeddingEngine(default_model_path(), device="cpu", dtype="bf16")
    try:
        assert bf16.dtype_name == "bf16"
        together = bf16.encode(texts[:48])
        assert cosine_deviation(together, reference.encode(texts[:48])) <= 1e-3
        # Other batch shapes round differently in bf16, far below the parity bar.
        alone = np.stack([bf16.encode([t])[0] for t in texts[:48:8]])
        assert cosine_deviation(alone, together[::8]) <= 1e-4
    finally:
        bf16.close()


def test_chunker_ids_give_the_same_vectors_without_a_second_tokenization(
    engine: EmbeddingEngine, texts: list[str]
) -> None:
    ids = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert cosine_deviation(engine.encode_ids(ids), engine.encode(texts)) <= 1e-6
    # The engine's own Rust tokenization equals the model tokenizer's (parity of the two tokenizers).
    assert engine.tokenize(texts) == [engine.tokenizer(t)["input_ids"] for t in texts]


def test_vectors_do_not_depend_on_batch_composition(engine: EmbeddingEngine, texts: list[str]) -> None:
    together = engine.encode(texts)
    order = list(range(len(texts)))
    random.Random(3).shuffle(order)
    shuffled = engine.encode([texts[i] for i in order])
    alone = np.stack([engine.encode([texts[i]])[0] for i in range(0, len(texts), 17)])
    assert cosine_deviation(shuffled, together[order]) <= 1e-6
    assert cosine_deviation(alone, together[::17]) <= 1e-6


def test_edge_inputs_have_clear_results(engine: EmbeddingEngine, reference: SentenceTransformerEncoder) -> None:
    assert engine.encode([]).shape == (0, 384) and engine.encode_ids([]).shape == (0, 384)
    # Empty ids, with or without the special tokens, embed as the empty text does (never NaN).
    empty_ids = np.concatenate([engine.encode_ids([[]]), engine.encode_ids([[]], special=True)])
    assert cosine_deviation(empty_ids, np.repeat(engine.encode([""]), 2, axis=0)) <= 1e-6
    before = engine.truncated
    engine.encode_ids([[1996] * 1000])  # ids past the window are cut as text is, and counted
    assert engine.truncated == before + 1
    empty = engine.encode(["", "   "])
    assert np.all(np.isfinite(empty)) and cosine_deviation(empty, reference.encode(["", "   "])) <= 1e-3
    long_text = "word " * 5000
    before = engine.truncated
    vec = engine.encode([long_text])
    assert engine.truncated == before + 1  # counted, never silent
    assert cosine_deviation(vec, reference.encode([long_text])) <= 1e-3  # truncated where ST truncates


def test_the_engine_serves_as_the_pipeline_encoder(engine: EmbeddingEngine) -> None:
    chunker = Chunker(engine.tokenizer, engine.max_tokens, 32)
    chunks = chunker("A long row. " * 400)
    assert len(chunks) > 1
    before = engine.truncated
    vecs = engine.encode(chunks)
    assert vecs.shape == (len(chunks), engine.dim)
    assert engine.truncated == before  # the chunker's windows always fit the model
    assert max(len(ids) for ids in engine.tokenize(chunks)) <= engine.max_seq


def test_plan_batches_keeps_every_input_once_within_the_budget() -> None:
    rng = random.Random(5)
    lengths = [rng.randint(1, 300) for _ in range(1000)]
    batches = plan_batches(lengths, token_budget=2048, multiple=8)
    rows = [i for b in batches for i in b.rows]
    assert sorted(rows) == list(range(1000))
    for b in batches:
        assert b.length % 8 == 0 and all(lengths[i] <= b.length for i in b.rows)
        assert len(b.rows) * b.length <= 2048 or len(b.rows) == 1
    padded = sum(len(b.rows) * b.length for b in batches)
    assert padded <= sum(lengths) * 1.1  # sorted buckets: little padding


NON_ASCII = ["ＦＵＬＬＷＩＤＴＨ", "\u0301combining", "\ufeffBOM", "Ελληνικά Русский العربية", "naïve café", "汉字 🚀"]


def test_flash_tokenizer_serves_ascii_text_with_the_model_tokenizers_ids(engine: EmbeddingEngine) -> None:
    tok = engine.text_tokenizer
    assert tok.backend == "flash+rust", tok.why_not_flash  # installed with the project, and agreed at load
    texts = [*corpus(engine.tokenizer, 300), *probe_texts(300, seed=99), *NON_ASCII, "word " * 400]
    want = [engine.tokenizer(t, truncation=True, max_length=engine.max_seq)["input_ids"] for t in texts]
    got, cut = tok(texts)
    assert got == want
    assert cut == sum(1 for t in texts if len(engine.tokenizer(t)["input_ids"]) > engine.max_seq) > 0
    rust = TextTokenizer.of_model(engine.model_dir, engine.max_seq, "rust")
    assert rust.backend == "rust" and rust(texts) == (got, cut)
    # Special-token strings in raw text are the tokens themselves to the model's tokenizer; flash-tokenizer
    # would split them as words, so such text is routed to the Rust tokenizer.
    specials = ["hello [SEP] world", "[CLS] x [MASK] y", "[PAD]", "a [UNK] b", "caf\u00e9 [SEP]", "[sep] lower"]
    assert tok(specials) == rust(specials) and tok(specials)[0][0][2] == 102


def test_a_disagreeing_flash_tokenizer_is_not_used(engine: EmbeddingEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(self: TextTokenizer, flash: object, texts: list[str]) -> list[list[int]]:
        return [[101, 100, 102] for _ in texts]

    monkeypatch.setattr(TextTokenizer, "_flash_ids", wrong)
    fallback = TextTokenizer.of_model(engine.model_dir, engine.max_seq, "auto")
    assert fallback.backend == "rust" and "disagreed" in fallback.why_not_flash
    assert fallback(["hello world"])[0] == [engine.tokenizer("hello world")["input_ids"]]
    with pytest.raises(RuntimeError, match="tokenizer=flash: flash-tokenizer disagreed"):
        TextTokenizer.of_model(engine.model_dir, engine.max_seq, "flash")


def test_texts_and_ids_mix_in_one_call_without_tokenizing_the_ids(engine: EmbeddingEngine, texts: list[str]) -> None:
    ids = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    items: list[str | list[int]] = [t if i % 3 else ids[i] for i, t in enumerate(texts)]
    before = engine.tokenized
    mixed = engine.encode_mixed(items)
    assert engine.tokenized == before + sum(1 for x in items if isinstance(x, str))
    assert cosine_deviation(mixed, engine.encode(texts)) <= 1e-6
    before = engine.tokenized
    engine.encode_ids(ids)
    assert engine.tokenized == before  # ids in: no tokenization at all


def test_macro_batches_pipelined_through_the_host_thread_give_the_same_vectors(texts: list[str]) -> None:
    small = EmbeddingEngine(default_model_path(), device="cpu", dtype="fp32", token_budget=1024, macro_batch=40)
    try:
        assert len(texts) > 3 * small.macro_batch
        whole = small.encode(texts)
        small.macro_batch = 100_000
        assert cosine_deviation(whole, small.encode(texts)) <= 1e-6
    finally:
        small.close()


def test_the_bench_corpus_is_mixed_length_distinct_and_deterministic(engine: EmbeddingEngine) -> None:
    # The model's tokenizer.json truncates at 128 tokens: a corpus cut from its offsets once came out as
    # near-copies of the first 128 tokens of the documentation (mean 66 tokens instead of ~110).
    chunks = corpus(engine.tokenizer, 1500)
    lengths = [len(ids) for ids in engine.tokenize(chunks)]
    assert 95 <= sum(lengths) / len(lengths) <= 125 and min(lengths) >= 20 and max(lengths) > 200
    assert len(set(chunks)) == len(chunks) and corpus(engine.tokenizer, 1500) == chunks


def test_the_writer_hands_the_chunkers_ids_to_the_engine_tokenizing_nothing_twice(engine: EmbeddingEngine) -> None:
    chunker = Chunker(engine.tokenizer, 64, 8)  # small windows: most rows span several
    index = MemoryIndex()
    index.ensure_collection(engine.dim)
    writer = IndexWriter(index, engine, chunker, SOURCES)
    parts = corpus(engine.tokenizer, 60)
    bodies = [" ".join(parts[i : i + 3]) for i in range(0, 60, 3)] + [*NON_ASCII, "short row", "  "]
    events = [
        ChangeEvent("public.docs", Op.CREATE, {"id": i}, {"id": i, "body": b}, SourcePosition(100 + i, 1000 + i))
        for i, b in enumerate(bodies)
    ]
    pieces = chunker.pieces_many(bodies)
    assert [[p.text for p in ps] for ps in pieces] == [chunker(b) for b in bodies]  # the same chunks either way
    with_ids = [p for ps in pieces for p in ps if p.ids is not None]
    without = sum(len(ps) for ps in pieces) - len(with_ids)
    assert len(with_ids) > 3 * without  # windows cut inside a word carry no ids; most are cut between words
    for p in with_ids:  # the ids handed over are exactly the chunk text's own tokenization
        assert p.ids == engine.tokenizer(p.text, add_special_tokens=False)["input_ids"]

    before = engine.tokenized
    stats = writer.apply(events)
    assert stats.embedded == len(index.points) == len(with_ids) + without
    assert engine.tokenized - before == without  # only the chunks without exact ids were tokenized again
    stored = list(index.points.values())
    vectors = np.stack([v for v, _ in stored])
    assert cosine_deviation(vectors, engine.encode([p["text"] for _, p in stored])) <= 1e-6


def test_flash_tokenizer_agrees_on_every_extra_character_in_every_context(engine: EmbeddingEngine) -> None:
    # FLASH_EXTRA is the set of non-ASCII characters routed to flash-tokenizer: each one, in many contexts and
    # in random mixes with ASCII and with each other, must give exactly the model tokenizer's ids.
    tok = engine.text_tokenizer
    rng = random.Random(21)
    base = string.ascii_letters + string.digits + " .,;:!?'\"()-"
    extra = list(FLASH_EXTRA)
    probes = [flash_contexts(ch) for ch in extra]
    probes += ["".join(rng.choice(base + ch * 3) for _ in range(40)) for ch in extra for _ in range(3)]
    probes += ["".join(rng.choice(extra + list(base)) for _ in range(rng.randint(1, 400))) for _ in range(2000)]
    assert all(tok.other.search(p) is None for p in probes)  # all of them take the flash path
    got, cut = tok(probes)
    rust = TextTokenizer.of_model(engine.model_dir, engine.max_seq, "rust")
    want, want_cut = rust(probes)
    assert cut == want_cut and [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b] == []
    # ...and text with other characters takes the Rust path.
    assert all(tok.other.search(t) for t in NON_ASCII if t not in ("naïve café",))


def test_flash_tokenizer_works_from_a_folder_with_only_tokenizer_json(engine: EmbeddingEngine, tmp_path: Path) -> None:
    # Newer transformers save a model's tokenizer as tokenizer.json alone (the fp16 export for the GPU box).
    shutil.copy(engine.model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = TextTokenizer.of_model(tmp_path, engine.max_seq)
    assert tok.backend == "flash+rust", tok.why_not_flash
    texts = [*corpus(engine.tokenizer, 200), *probe_texts(200, seed=5)]
    assert tok(texts) == engine.text_tokenizer(texts)


def test_the_window_is_sentence_transformers_window(engine: EmbeddingEngine, tmp_path: Path) -> None:
    assert engine.max_seq == model_window(engine.model_dir) == 256  # sentence_bert_config.json
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    assert model_window(tmp_path) == 512
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1000000000000000019884624838656}')
    assert model_window(tmp_path) == 512  # "no limit": the position embeddings decide
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    assert model_window(tmp_path) == 256  # a folder saved without sentence_bert_config's max_seq_length


def test_a_model_folders_prompts_reach_documents_through_ids_and_queries(
    engine: EmbeddingEngine, tmp_path: Path
) -> None:
    folder = tmp_path / "e5-style"
    folder.mkdir()
    for item in default_model_path().iterdir():
        (folder / item.name).symlink_to(item)
    config = folder / "config_sentence_transformers.json"
    declared = {**json.loads(config.read_text()), "prompts": {"query": "query: ", "document": "passage: "}}
    config.unlink()
    config.write_text(json.dumps(declared))
    settings = load_settings(RagtideSettings, encoder={"model_path": str(folder)}, chunking={"max_tokens": 510})
    enc = build_encoder(settings)
    spec = desired_generation(settings, enc)
    assert (spec.query_prefix, spec.document_prefix) == ("query: ", "passage: ")
    prompt = enc.tokenizer("passage: ", add_special_tokens=False)["input_ids"]
    assert len(prompt) == 2 and spec.max_tokens == enc.max_tokens - 2  # "passage", ":" off the window

    index = MemoryIndex()
    index.ensure_collection(enc.dim)
    chunker = Chunker(enc.tokenizer, spec.max_tokens, spec.overlap)
    writer = IndexWriter(index, enc, chunker, SOURCES, document_prefix=spec.document_prefix)
    text = "How to rotate the signing keys of a service without downtime"
    row = ChangeEvent("public.docs", Op.CREATE, {"id": 1}, {"id": 1, "body": text}, SourcePosition(10, 1))
    assert writer.apply([row]).embedded_from_ids == 1  # the chunker's ids, with the prompt's ids before them
    prompted, plain = engine.encode([f"passage: {text}", text])
    assert index.search(prompted, 1)[0].score > 0.999 > index.search(plain, 1)[0].score

    query = with_query_prefix(enc, spec.query_prefix)
    assert cosine_deviation(query.encode(["rotate keys"]), engine.encode(["query: rotate keys"])) <= 1e-3
    overrides = load_settings(RagtideSettings, encoder={"model_path": str(folder), "query_prefix": ""})
    assert prompts(overrides, enc) == ("", "passage: ")  # a setting wins over the folder's prompt


def thread_nices() -> dict[int, int]:
    """This process's threads: native id -> nice value (field 19 of /proc/self/task/<tid>/stat)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            out[int(task.name)] = int(stat[stat.rindex(")") + 2 :].split()[16])
    return out


def test_an_engine_with_its_own_thread_count_runs_its_passes_with_that_team_and_leaves_the_process_its_own(
    engine: EmbeddingEngine, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's search engine (encoder.query_threads: 1): its forward passes run with a team of one, so they never
    wait at an op's barrier for a thread the writer's engine preempted; the caller, and threads started later (the
    writer's engine, the process's other work), keep torch's count. The vectors are the same."""
    import torch

    process_wide = torch.get_num_threads()
    assert process_wide > 1, "needs a machine with 2 cores or more"
    alone = EmbeddingEngine(default_model_path(), device="cpu", dtype="fp32", token_budget=2048, threads=1)
    try:
        assert alone._on_forward(torch.get_num_threads) == 1
        assert torch.get_num_threads() == process_wide
        later: list[int] = []
        started = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        started.start()
        started.join()
        assert later == [process_wide]
        assert cosine_deviation(alone.encode(texts[:80]), engine.encode(texts[:80])) < 1e-6
    finally:
        alone.close()
    # The node's, by default, on a CPU with native bf16 (where the writer's engine runs bf16): queries in fp32.
    monkeypatch.setattr(engine_module, "cpu_info", lambda: {"model": "test", "cpus": 2, "features": ["avx512_bf16"]})
    node = node_query_encoder(load_settings(RagtideSettings), CollectorRegistry())
    try:
        assert isinstance(node, EmbeddingEngine) and node._on_forward(torch.get_num_threads) == 1
        assert node.dtype_name == "fp32" and node.precision == "float"  # encoder.query_dtype auto, on CPU
    finally:
        node.close()


def test_a_niced_engine_embeds_on_threads_at_its_nice_value_with_the_same_vectors(
    engine: EmbeddingEngine, texts: list[str]
) -> None:
    """The node's writer engine (encoder.ingest_nice): its forward passes run on its own thread at that nice value,
    and so do the threads of the OpenMP team that thread starts (the matmuls' other cores); the caller's thread,
    and so search's engine, keep theirs. The vectors are the same."""
    import torch

    before = thread_nices()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    niced = EmbeddingEngine(default_model_path(), device="cpu", dtype="fp32", token_budget=2048, nice=7)
    try:
        got = niced.encode(texts[:80])
        new = {tid: n for tid, n in thread_nices().items() if tid not in before}
        lowered = [tid for tid, n in new.items() if n == min(19, mine + 7)]
        # the forward thread, the host thread, and the forward thread's OpenMP workers, 7 steps below this one
        assert len(lowered) >= 2 + (torch.get_num_threads() - 1), new
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
        assert cosine_deviation(got, engine.encode(texts[:80])) < 1e-6
    finally:
        niced.close()
