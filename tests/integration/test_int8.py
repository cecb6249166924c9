"""The int8 engine on the real model (CPU, ONNX Runtime): its quality gates against fp32, and its cached artifact.

The gates, on the real model and the real corpora:
- vectors: mean cosine to fp32 >= 0.99 on the bench corpus (and no chunk below 0.95);
- search: top-10 overlap with fp32, averaged over a fixed set of questions on the demo corpus, each side embedding
  its queries and its chunks with its own precision (as a generation does). The gate is 0.95: today's recipe
  (SmoothQuant, then per-token scales on the MatMuls with one fixed activation scale, QKV in fp32, 7-bit weights
  on x86) measures 0.956, the one before it 0.91 (bf16 measures 0.99).
Both gates run on whatever CPU runs the suite. With 8-bit weights on a CPU without VNNI, AVX2's saturating int16
sums took the mean cosine to 0.979 and the overlap to 0.856, and these tests failed there.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ragtide.bench.embed import corpus, matmul_rates
from ragtide.compose import desired_generation, generation_factory
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder import quantized
from ragtide.embedder.chunking import Chunker
from ragtide.embedder.encoder import default_model_path
from ragtide.embedder.engine import EmbeddingEngine
from ragtide.embedder.generations import GenerationSpec
from ragtide.ingest.demo import demo_rows
from ragtide.ingest.sources import SourcesConfig, SourceTable

QUESTIONS = [
    "how do I catch an exception and run cleanup code",
    "what does the with statement do",
    "operator precedence in expressions",
    "how are default argument values evaluated",
    "define a class with a custom constructor",
    "what is a generator function and yield",
    "how does string formatting with f-strings work",
    "compare two objects for equality",
    "what happens when an attribute is looked up on an instance",
    "import a module from a package",
    "how do for loops iterate over sequences",
    "what are the rules for variable scope and global names",
    "slicing a list with a step",
    "how to write a lambda expression",
    "what does the assert statement do",
    "bitwise operators on integers",
    "how do context managers implement __enter__ and __exit__",
    "what are the truth values of objects",
    "dictionary displays and comprehensions",
    "how does a while loop with else work",
    "raise an exception with a cause",
    "what is the difference between is and ==",
    "how async functions and await work",
    "keyword-only arguments in a function definition",
    "how to delete a name or an item",
    "boolean operations and short-circuit evaluation",
    "special methods for container emulation",
    "the pass statement",
    "numeric literals: integers, floats and imaginary numbers",
    "how are decorators applied to functions",
    "the return statement in a function",
    "conditional expressions",
]


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[EmbeddingEngine, EmbeddingEngine]]:
    fp32 = EmbeddingEngine(default_model_path(), device="cpu", dtype="fp32")
    int8 = EmbeddingEngine(default_model_path(), device="cpu", dtype="int8")
    yield fp32, int8
    fp32.close()
    int8.close()


def test_int8_vectors_stay_close_to_fp32_on_the_bench_corpus(
    engines: tuple[EmbeddingEngine, EmbeddingEngine],
) -> None:
    fp32, int8 = engines
    assert (int8.dtype_name, int8.precision, fp32.precision) == ("int8", "int8", "float")
    texts = corpus(fp32.tokenizer, 400)
    got, want = int8.encode(texts), fp32.encode(texts)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = (got * want).sum(axis=1)
    assert cosines.mean() >= 0.99, cosines.mean()
    assert cosines.min() >= 0.95, cosines.min()
    assert cosines.mean() < 0.99999  # the int8 path really ran: quantization moves every vector a little


def test_int8_search_keeps_the_top_10_of_fp32_on_the_demo_corpus(
    engines: tuple[EmbeddingEngine, EmbeddingEngine],
) -> None:
    fp32, int8 = engines
    chunker = Chunker(fp32.tokenizer, 200, 32)  # the writer's default chunking
    chunks = [piece for row in demo_rows() for piece in chunker(f"{row['title']}\n\n{row['body']}")]
    assert len(chunks) > 400

    def top10(engine: EmbeddingEngine) -> list[set[int]]:
        docs, queries = engine.encode(chunks), engine.encode(QUESTIONS)
        return [set(np.argsort(-row)[:10].tolist()) for row in queries @ docs.T]

    overlap = [len(a & b) / 10 for a, b in zip(top10(int8), top10(fp32), strict=True)]
    # 0.956 with per-token scales, a fixed activation scale and QKV in fp32 (0.9125 without them, 0.89 without
    # the smoothing either)
    assert float(np.mean(overlap)) >= 0.95, (float(np.mean(overlap)), overlap)


def test_an_int8_vector_does_not_depend_on_the_texts_embedded_with_it(
    engines: tuple[EmbeddingEngine, EmbeddingEngine],
) -> None:
    """A row embedded alone (an update) gets the vector a backfill's batch gave it: the int8 MatMuls' inputs are
    quantized with a fixed scale, not with the batch's min and max (with those, vectors moved up to 5e-3 an
    element with their batch-mates)."""
    _, int8 = engines
    texts = corpus(int8.tokenizer, 96)
    together = int8.encode(texts)  # several batches of mixed lengths, padded
    alone = np.stack([int8.encode([text])[0] for text in texts[::6]])
    assert np.abs(alone - together[::6]).max() < 1e-5


def test_smoothing_keeps_the_function_and_flattens_what_int8_sees(tmp_path: Path) -> None:
    """SmoothQuant on the fused fp32 graph: each LayerNorm-fed projection (QKV and the FFN's first layer, in every
    layer) gets a Mul in front, the graph computes the same hidden states, and on texts the calibration did not
    see, the largest channel of what the quantizer will see stands less far above the median one."""
    import onnx
    import onnxruntime as ort

    model_dir = default_model_path()
    fused = quantized.fused_graph(model_dir, tmp_path).model
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(fused)
    batches = quantized.calibration_batches(model_dir)
    quantized.smooth_layernorm_inputs(smoothed, batches[:8], quantized.SMOOTHING)
    muls = [n for n in smoothed.graph.node if n.op_type == "Mul" and n.name.endswith("/smooth")]
    layers = int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
    assert len(muls) == 2 * layers

    def hidden(graph: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, batches[20])[0])

    assert np.abs(hidden(smoothed) - hidden(fused)).max() < 1e-4  # the same function in floats
    scaled = onnx.ModelProto()
    scaled.CopyFrom(smoothed)
    quantized.scale_per_token(scaled)
    divided = [n for n in scaled.graph.node if n.op_type == "MatMul" and n.input[0].startswith("per_token_")]
    assert len(divided) == 3 * layers  # the attention's output and the FFN's two layers, in each layer
    assert sum(n.op_type == "Div" for n in scaled.graph.node) == 3 * layers
    assert np.abs(hidden(scaled) - hidden(fused)).max() < 1e-4  # per-token scales: the same function too
    held_out = batches[8:16]
    before = quantized.channel_peaks(fused, held_out, sorted({m.input[0] for m in muls}))
    after = quantized.channel_peaks(smoothed, held_out, [m.output[0] for m in muls])
    for mul in muls:
        spread_before = before[mul.input[0]].max() / np.median(before[mul.input[0]])
        spread_after = after[mul.output[0]].max() / np.median(after[mul.output[0]])
        assert spread_after < 0.75 * spread_before, (mul.name, spread_before, spread_after)


def test_the_artifact_is_keyed_by_the_model_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    key = quantized.artifact_key(model, bits=7)
    assert quantized.artifact_key(model, bits=7) == key
    config = model / "config.json"
    config.write_text(config.read_text() + "\n")
    assert quantized.artifact_key(model, bits=7) != key  # a changed model never loads another model's int8 weights
    assert quantized.artifact_key(model, bits=7) != quantized.artifact_key(model, bits=8)


def test_on_x86_the_weights_are_7_bit(engines: tuple[EmbeddingEngine, EmbeddingEngine]) -> None:
    """AVX2 without VNNI adds two u8 x s8 products into a saturating int16: 7-bit weights keep every pair in
    range (with 8 the mean cosine to fp32 fell to 0.979 there). VNNI gets them too, so every x86 CPU computes the
    same integer products. Only the MatMuls are int8: QKV and the word embeddings stay fp32."""
    import onnx
    from onnx import numpy_helper

    _, int8 = engines
    assert int8.int8 is not None
    model = onnx.load(str(int8.int8.path))
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2  # not the per-channel zero points
    ]
    layers = int(json.loads((default_model_path() / "config.json").read_text())["num_hidden_layers"])
    assert len(weights) == 3 * layers  # attention output and the FFN's two, in each layer; QKV stays fp32
    peak = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert peak == (64 if quantized.weight_bits() == 7 else 127), peak


def test_a_cached_artifact_is_reused_not_rebuilt(engines: tuple[EmbeddingEngine, EmbeddingEngine]) -> None:
    _, int8 = engines
    assert int8.int8 is not None
    path = int8.int8.path
    before = path.stat().st_mtime_ns
    assert quantized.artifact(default_model_path()) == path
    assert path.stat().st_mtime_ns == before


def test_each_generation_is_served_in_its_own_precision(
    tmp_path: Path, engines: tuple[EmbeddingEngine, EmbeddingEngine]
) -> None:
    """A deployment configured for fp32 that finds an int8 generation live (or the other way round) embeds that
    generation's chunks and queries in int8: one collection never mixes precisions."""
    fp32, int8 = engines
    settings = RagtideSettings(data_dir=tmp_path, encoder={"dtype": "fp32"})
    sources = SourcesConfig(sources=(SourceTable(table="public.docs", key=("id",), text="{body}"),))
    float_spec = desired_generation(settings, fp32)
    int8_spec = desired_generation(settings, int8)
    assert (float_spec.precision, int8_spec.precision) == ("float", "int8")
    assert int8_spec.fingerprint != float_spec.fingerprint
    assert int8_spec == GenerationSpec.from_dict({**float_spec.as_dict(), "precision": "int8"})
    make = generation_factory(settings, fp32, sources)
    live, other = make(float_spec), make(int8_spec)
    try:
        assert live.encoder is fp32  # the configured encoder serves its own generation
        assert other.encoder.precision == "int8" and other.encoder is not fp32
        assert other.index is not live.index and int8_spec.collection("c") != float_spec.collection("c")
        text = ["a change in Postgres is searchable in well under a second"]
        assert float((other.encoder.encode(text) * int8.encode(text)).sum()) > 0.99999  # the same int8 model
    finally:
        for gen in (live, other):
            gen.index.close()


def test_the_embed_bench_times_int8_against_fp32_matmul_alone() -> None:
    """`bench embed` reports what int8 buys ONNX Runtime's MatMul alone on the CPU it ran on, beside the model."""
    m = matmul_rates(512, 128, 256, bits=quantized.weight_bits(), threads=1, repeats=2)
    assert m["shape"] == [512, 128, 256] and m["threads"] == 1
    assert m["int8_over_fp32"] == pytest.approx(m["int8_gflops"] / m["fp32_gflops"], rel=0.05)
