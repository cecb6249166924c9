"""The embedding engine on a CUDA device (skipped where there is none; run on the GPU box by
`infra/scripts/gpu-bench.sh`): fp16/bf16 parity with the fp32 sentence-transformers reference, the ids path,
independence from batch composition, and a launch path that never makes the host wait for the device."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device here", allow_module_level=True)

from ragtide.bench.embed import corpus, cosine_deviation  # noqa: E402
from ragtide.embedder.engine import EmbeddingEngine  # noqa: E402

EDGE = ["", "   ", "x", "word " * 2000, "naïve café 🚀 汉字", "ＦＵＬＬＷＩＤＴＨ"]


def model_dir() -> Path:
    env = os.environ.get("RAGTIDE_GPU_MODEL")
    if env:
        return Path(env)
    try:
        from ragtide.embedder.encoder import default_model_path

        return default_model_path()
    except ImportError:
        pytest.skip("no model: set RAGTIDE_GPU_MODEL to the fp16 folder `make gpu-kit` writes")


@pytest.fixture(scope="module")
def engine() -> Iterator[EmbeddingEngine]:
    e = EmbeddingEngine(model_dir(), device="cuda")
    yield e
    e.close()


@pytest.fixture(scope="module")
def texts(engine: EmbeddingEngine) -> list[str]:
    return [*corpus(engine.tokenizer, 3000), *EDGE]


@pytest.fixture(scope="module")
def reference(texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir()), device="cuda", local_files_only=True).float()
    out: np.ndarray = st.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    return out


def test_fp16_meets_the_parity_bar(engine: EmbeddingEngine, texts: list[str], reference: np.ndarray) -> None:
    assert engine.dtype_name == "fp16" and engine.cuda
    got = engine.encode(texts)
    assert got.shape == reference.shape and got.dtype == np.float32
    assert cosine_deviation(got, reference) <= 1e-3
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_bf16_meets_the_parity_bar(texts: list[str], reference: np.ndarray) -> None:
    bf16 = EmbeddingEngine(model_dir(), device="cuda", dtype="bf16")
    try:
        assert cosine_deviation(bf16.encode(texts), reference) <= 1e-3
    finally:
        bf16.close()


def test_ids_path_and_batch_composition(engine: EmbeddingEngine, texts: list[str]) -> None:
    together = engine.encode(texts)
    ids = [s[1:-1] for s in engine.tokenize(texts)]
    assert cosine_deviation(engine.encode_ids(ids), together) <= 1e-4
    order = list(range(len(texts)))
    random.Random(3).shuffle(order)
    assert cosine_deviation(engine.encode([texts[i] for i in order]), together[order]) <= 1e-3
    alone = np.stack([engine.encode([texts[i]])[0] for i in range(0, len(texts), 97)])
    assert cosine_deviation(alone, together[::97]) <= 1e-3


def test_launching_a_macro_batch_never_waits_for_the_device(engine: EmbeddingEngine, texts: list[str]) -> None:
    batches = engine._prepare(texts, special=False)
    assert any(not b.full for b in batches)  # masked batches too, not only unpadded ones
    with torch.inference_mode():
        engine.model(input_ids=batches[0].ids.cuda(), attention_mask=None)  # warm: lazy init may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            host, done = engine._launch(len(texts), batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = engine._collect(host, done)
    assert cosine_deviation(got, engine.encode(texts)) <= 1e-4


def test_pipelined_macro_batches_match_one_macro_batch(texts: list[str]) -> None:
    small = EmbeddingEngine(model_dir(), device="cuda", macro_batch=700)
    try:
        pipelined = small.encode(texts)
        small.macro_batch = 1_000_000
        assert cosine_deviation(pipelined, small.encode(texts)) <= 1e-4
    finally:
        small.close()
