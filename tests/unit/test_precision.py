"""Which precision the engine runs in, and why: chosen by CPU features, overridden by configuration, and held by
an existing generation (whose vectors must stay comparable), which auto keeps. No model is loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ragtide.compose import kept_precision
from ragtide.contracts.settings import RagtideSettings
from ragtide.embedder import engine
from ragtide.embedder.encoder import QueryVectors, Vectors
from ragtide.embedder.generations import Catalog, GenerationSpec
from ragtide.embedder.generations.catalog import CatalogState
from ragtide.embedder.index.memory import MemoryIndex
from tests.doubles import HashEncoder

AVX2 = ["avx2", "fma"]
BF16 = ["avx2", "fma", "avx512f", "avx512_bf16"]


@pytest.fixture
def features(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    have: list[str] = []
    monkeypatch.setattr(engine, "cpu_info", lambda: {"model": "test", "cpus": 2, "features": have})
    return have


@pytest.mark.parametrize(
    ("cpu", "requested", "cuda", "precision", "want"),
    [
        (BF16, "auto", False, None, "bf16"),
        (AVX2, "auto", False, None, "int8"),  # AVX2 without native bf16: int8 (both quality gates met)
        ([*AVX2, "avx512f", "avx512_vnni"], "auto", False, None, "int8"),
        ([], "auto", False, None, "fp32"),  # no AVX2 (or not x86): no int8 kernel worth its loss
        (AVX2, "auto", False, "float", "fp32"),  # auto on a float index: it stays float
        (AVX2, "auto", True, None, "fp16"),
        (AVX2, "int8", False, None, "int8"),
        (BF16, "fp32", False, None, "fp32"),
        (AVX2, "fp32", False, "int8", "int8"),  # an int8 generation keeps int8 vectors
        (AVX2, "int8", False, "float", "fp32"),  # a float generation keeps float vectors
        (BF16, "int8", False, "float", "bf16"),
        (AVX2, "auto", True, "float", "fp16"),
        (AVX2, "bf16", False, "float", "bf16"),  # any float precision serves a float generation
    ],
)
def test_the_precision_follows_cpu_configuration_and_generation(
    features: list[str], cpu: list[str], requested: engine.DType, cuda: bool, precision: str | None, want: str
) -> None:
    features.extend(cpu)
    chosen, why = engine.choose_dtype(requested, cuda, precision)
    assert chosen == want and why


@pytest.mark.parametrize(
    ("cpu", "requested", "cuda", "precision", "want"),
    [
        (BF16, "auto", False, None, "fp32"),  # short query passes: fp32 beats bf16 even where bf16 is native
        (BF16, "auto", False, "float", "fp32"),
        (AVX2, "auto", False, None, "int8"),  # auto makes a new index int8 here: its queries too
        (AVX2, "auto", False, "float", "fp32"),
        (BF16, "auto", True, "float", "fp16"),
        (BF16, "auto", False, "int8", "int8"),  # an int8 generation's queries are int8
        (BF16, "bf16", False, "float", "bf16"),  # encoder.query_dtype (or encoder.dtype), set
        (BF16, "int8", False, "float", "fp32"),  # encoder.dtype int8, a float generation still live
        (AVX2, "int8", False, None, "int8"),  # encoder.dtype int8, the new generation's queries
    ],
)
def test_search_queries_run_in_fp32_on_cpu_unless_configured_or_int8(
    features: list[str], cpu: list[str], requested: engine.DType, cuda: bool, precision: str | None, want: str
) -> None:
    features.extend(cpu)
    chosen, why = engine.choose_dtype(requested, cuda, precision, queries=True)
    assert chosen == want and why


def test_auto_picks_fp32_where_onnx_runtime_is_missing(features: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    features.extend(AVX2)
    monkeypatch.setattr(engine.quantized, "available", lambda: False)
    assert engine.choose_dtype("auto", False)[0] == "fp32"
    assert engine.choose_dtype("auto", False, queries=True)[0] == "fp32"


def test_auto_keeps_the_live_generations_precision_and_a_configured_dtype_does_not() -> None:
    """auto's pick differs by CPU: an index made int8 on an AVX2 machine stays int8 when a process on a bf16 CPU (or
    an upgrade that changes the pick) starts on it, and a float index stays float; encoder.dtype set decides."""
    catalog = Catalog(MemoryIndex())
    auto = RagtideSettings()
    assert auto.encoder.dtype == "auto" and kept_precision(auto, catalog) is None  # a new index: the CPU's pick
    catalog.write(CatalogState(live=replace(MINILM, precision="int8")))
    assert kept_precision(auto, catalog) == "int8"
    catalog.write(CatalogState(live=MINILM))
    assert kept_precision(auto, catalog) == "float"
    for field, value in (("dtype", "int8"), ("dtype", "fp32"), ("backend", "sentence-transformers")):
        configured = auto.model_copy(update={"encoder": auto.encoder.model_copy(update={field: value})})
        assert kept_precision(configured, catalog) is None


def test_auto_does_not_carry_an_int8_index_over_to_another_model(tmp_path: Path) -> None:
    """The int8 of the packaged model passed the gates; a model folder set under auto gets its own precision."""
    catalog = Catalog(MemoryIndex())
    catalog.write(CatalogState(live=replace(MINILM, precision="int8")))
    other = tmp_path / "e5-small"
    other.mkdir()
    assert kept_precision(RagtideSettings(encoder={"model_path": str(other)}), catalog) is None
    assert kept_precision(RagtideSettings(encoder={"model_path": str(other)}), catalog, "float") == "float"


def test_auto_picks_int8_only_for_the_model_its_gates_were_measured_on(features: list[str], tmp_path: Path) -> None:
    features.extend(AVX2)
    assert engine.int8_gated(None) and engine.int8_gated(engine.default_model_path())
    assert not engine.int8_gated(tmp_path)  # another model: its int8 never passed the gates
    assert engine.choose_dtype("auto", False, gated=False)[0] == "fp32"
    assert engine.choose_dtype("auto", False, queries=True, gated=False)[0] == "fp32"
    assert engine.choose_dtype("int8", False, gated=False)[0] == "int8"  # set: any BERT-like model


def test_a_new_index_of_several_processes_is_float_under_auto_and_the_nodes_is_the_cpus_pick() -> None:
    """Standalone embedders and retrievers may run on other CPUs, each of which would pick its own precision before
    any of them wrote the catalog: they make a new index float. The node, one process, takes its CPU's pick."""
    catalog = Catalog(MemoryIndex())
    assert kept_precision(RagtideSettings(), catalog, "float") == "float"
    assert kept_precision(RagtideSettings(), catalog) is None
    catalog.write(CatalogState(live=replace(MINILM, precision="int8")))
    assert kept_precision(RagtideSettings(), catalog, "float") == "int8"


@pytest.mark.parametrize("root", ["create_embedder", "create_retriever_app"])
def test_standalone_embedders_and_retrievers_open_a_new_index_as_float_under_auto(
    monkeypatch: pytest.MonkeyPatch, root: str
) -> None:
    from ragtide import compose

    asked: dict[str, object] = {}

    def build(settings: RagtideSettings, **kw: object) -> None:
        asked.update(kw)
        raise LookupError("stop here")

    monkeypatch.setattr(compose, "build_encoder", build)
    monkeypatch.setattr(compose, "open_catalog", lambda settings: Catalog(MemoryIndex()))
    with pytest.raises(LookupError):
        getattr(compose, root)(RagtideSettings(qdrant_url="http://127.0.0.1:1"))
    assert asked["precision"] == "float"


def test_the_engine_builder_asks_for_int8_under_auto_only_for_the_packaged_model(
    features: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ragtide import compose

    features.extend(AVX2)
    asked: list[tuple[object, ...]] = []

    def engine_of(path: Path, device: str, dtype: str, *args: object, **kw: object) -> None:
        asked.append((device, dtype))
        raise LookupError("stop here")

    monkeypatch.setattr(engine, "EmbeddingEngine", engine_of)
    for model_path in (None, tmp_path):
        with pytest.raises(LookupError):
            compose.build_encoder(RagtideSettings(encoder={"model_path": model_path}))
    assert asked == [("cpu", "int8"), ("cpu", "auto")]


def test_serve_embeddings_keeps_its_vectors_float_under_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its vectors land in other deployments' float generations: a CPU that auto would run in int8 must not change
    them under those generations."""
    from ragtide import compose

    asked: dict[str, object] = {}

    def build(settings: RagtideSettings, **kw: object) -> None:
        asked.update(kw)
        raise LookupError("stop here")

    monkeypatch.setattr(compose, "build_encoder", build)
    with pytest.raises(LookupError):
        compose.create_embeddings_app(RagtideSettings())
    assert asked["precision"] == "float"
    with pytest.raises(LookupError):
        compose.create_embeddings_app(RagtideSettings(encoder={"dtype": "int8"}))
    assert asked["precision"] is None


def test_a_serving_bench_against_a_baseline_pins_an_int8_index_so_neither_node_rebuilds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ragtide.bench import freshness, load

    live: dict[str, dict[str, str]] = {"live": {"precision": "int8"}}
    monkeypatch.setattr(freshness, "live_generation", lambda settings: live)
    assert load.same_precision(RagtideSettings()).encoder.dtype == "int8"
    set_ = RagtideSettings(encoder={"dtype": "fp32"})
    assert load.same_precision(set_) is set_
    live["live"]["precision"] = "float"
    assert load.same_precision(RagtideSettings()).encoder.dtype == "auto"


MINILM = GenerationSpec(model="all-MiniLM-L6-v2", dim=384, max_tokens=128, overlap=16)


class Int8Hash(HashEncoder):
    """The same model's name, int8 vectors (here: another vector for the same text)."""

    @property
    def precision(self) -> str:
        return "int8"

    def encode(self, texts: Sequence[str]) -> Vectors:
        return -super().encode(texts)


def test_remembered_query_vectors_are_kept_apart_by_precision() -> None:
    """A switch to or from int8 keeps the model's name: a query's float vector must not answer for int8."""
    vectors, float_enc, int8_enc = QueryVectors(), HashEncoder(), Int8Hash()
    first = vectors.embed(float_enc, "kafka lag")
    second = vectors.embed(int8_enc, "kafka lag")
    assert np.allclose(second, -first) and len(int8_enc.calls) == 1
    assert vectors.embed(float_enc, "kafka lag") is first and len(float_enc.calls) == 1


def test_a_catalog_with_an_unknown_precision_is_refused_with_the_cause() -> None:
    spec = GenerationSpec(model="m", dim=4, max_tokens=8, overlap=2).as_dict()
    with pytest.raises(ValueError, match="precision is one of float, int8, not 'fp16'"):
        GenerationSpec.from_dict({**spec, "precision": "fp16"})


def test_the_int8_calibration_texts_do_not_depend_on_what_the_process_imported_before() -> None:
    """The texts that calibrate int8's smoothing are the same in a process that imported submodules of the
    calibration modules first (uvicorn imports logging.config: each becomes an attribute of its package), so every
    host builds the same artifact for one Python version."""
    import subprocess
    import sys

    probe = "from ragtide.embedder.quantized import calibration_texts; print(hash(tuple(calibration_texts())))"
    first = "import logging.config, logging.handlers, unittest.mock, email.mime.text, http.server, json.tool; "

    def texts_hash(code: str) -> str:
        env = {"PYTHONHASHSEED": "0", "PATH": ""}
        return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env).stdout

    assert texts_hash(probe) == texts_hash(first + probe)


@pytest.mark.parametrize(
    ("machine", "bits"),
    [("x86_64", 7), ("AMD64", 7), ("aarch64", 8), ("arm64", 8)],
)
def test_int8_weights_have_7_bits_on_x86_and_8_elsewhere(
    monkeypatch: pytest.MonkeyPatch, machine: str, bits: int
) -> None:
    """x86 without VNNI sums two u8 x s8 products in a saturating int16 (`vpmaddubsw`); 7 bits keep them in range,
    and VNNI gets the same 7 so that every x86 CPU computes the same vectors. Other CPUs have no such sum."""
    from ragtide.embedder import quantized

    monkeypatch.setattr(quantized.platform, "machine", lambda: machine)
    assert quantized.weight_bits() == bits
