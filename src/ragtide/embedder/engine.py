"""The embedding engine: a sentence-transformers-compatible mean-pooling encoder without sentence-transformers'
per-call overhead. Imports only torch, transformers/tokenizers and numpy (flash-tokenizer where installed), so it
runs anywhere torch does.

What it does differently from `SentenceTransformer.encode`:
- Token ids in, not only text: token-aware chunking already tokenized every chunk with the same tokenizer, so
  the engine accepts those ids (`encode_ids`, `encode_mixed`) and never tokenizes twice.
- Text is tokenized in large batched calls: text of ASCII and FLASH_EXTRA characters by flash-tokenizer's C++
  WordPiece where it is installed and agrees with the model's tokenizer on probe sets at load (~10x the Rust
  tokenizer per core), everything else (other scripts, special-token strings) by the model's Rust fast
  tokenizer; the ids are identical either way (`TextTokenizer`).
- Token-budget batching: inputs are sorted by length and cut into batches whose padded size (rows x longest)
  stays under a token budget, so short inputs travel in big batches, long ones in small, and padding stays small.
- The host work of a macro-batch (tokenize, plan, pad into pinned buffers) runs in a worker thread while the
  device runs the previous one. On CUDA the main thread only queues work: non-blocking copies, a prepared
  attention mask (transformers' own mask building checks `mask.all()`, a device->host sync per batch), results
  scattered on the device and copied back once per macro-batch behind an event, so the launch queue stays full.
- fp16 (or bf16) weights on CUDA, pooling in fp32. On CPU: bf16 where the CPU has native bf16 dot products
  (AVX512_BF16 / AMX), int8 on other AVX2 CPUs for the packaged model (`quantized`: ONNX Runtime's int8 kernels
  over a cached artifact; the node's roots decide when an index takes it: `compose.kept_precision`), else fp32; a
  4,096-token budget (larger padded batches are slower on CPU caches).

Vectors are L2-normalised mean pools of the last hidden state, the same as the model's sentence-transformers
pipeline (Transformer -> Pooling(mean) -> Normalize); a parity test holds cosine >= 0.999 against it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from ragtide.contracts.machine import cpu_info
from ragtide.embedder import quantized
from ragtide.embedder.encoder import default_model_path, model_name_of, resolve_device
from ragtide.embedder.quantized import Int8Model
from ragtide.embedder.tokenize import TextTokenizer, TokenizerChoice

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
DType = Literal["auto", "fp32", "fp16", "bf16", "int8"]
T = TypeVar("T")
_THREAD_COUNT = threading.Lock()  # held while an engine thread of its own count starts (see EmbeddingEngine._worker)
INLINE_ROWS = 64  # smaller calls are prepared on the caller's thread: a thread hop costs more than the work


def thread_nice() -> int:
    """The calling thread's nice value (Linux: each thread has its own; elsewhere the process's)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (OSError, AttributeError):
        return 0


def set_thread_nice(nice: int) -> None:
    """Run the calling thread (and the threads it starts) at `nice`; where that is refused, as before."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:
        log.warning("could not lower the embedding threads' priority", extra={"nice": nice, "error": str(exc)})


def _start_engine_thread(nice: int | None, threads: int | None) -> None:
    """A new engine thread: its nice value, and the size of the intra-op (OpenMP) team its torch ops use."""
    if nice is not None:
        set_thread_nice(nice)
    if threads is not None:
        import torch

        torch.get_num_threads()  # torch's lazy init first: it would reset the count set below
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Batch:
    """Positions (into the caller's inputs) of one forward pass, and its padded length."""

    rows: list[int]
    length: int


def plan_batches(lengths: Sequence[int], token_budget: int, max_rows: int = 4096, multiple: int = 1) -> list[Batch]:
    """Sort by length and cut into batches of at most `token_budget` padded tokens (rows x padded length).

    `multiple` rounds each batch's padded length up (8 on CUDA: tensor-core friendly shapes). Every input ends up
    in exactly one batch; an input longer than the budget travels alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[Batch] = []
    rows: list[int] = []
    longest = 0
    for i in order:
        n = max(1, lengths[i])
        padded = -(-n // multiple) * multiple
        if (rows and (len(rows) + 1) * padded > token_budget) or len(rows) >= max_rows:
            batches.append(Batch(rows, longest))
            rows = []
        rows.append(i)
        longest = padded
    if rows:
        batches.append(Batch(rows, longest))
    return batches


def cpu_has_native_bf16() -> bool:
    """x86 CPUs with bf16 dot products (AVX512_BF16 or AMX): bf16 runs about 2.5x fp32 there at a cosine
    deviation of ~1e-4 from fp32; elsewhere bf16 is emulated and slower than fp32."""
    features = cpu_info()["features"]
    return "avx512_bf16" in features or "amx_bf16" in features


def cpu_runs_int8() -> bool:
    """x86 CPUs with AVX2 (VNNI or not) and no native bf16, where ONNX Runtime's int8 kernels are installed: int8
    runs 1.2-1.3x fp32 there within both quality gates (docs/embedding.md); elsewhere bf16 or fp32 is the pick."""
    features = cpu_info()["features"]
    return "avx2" in features and not cpu_has_native_bf16() and quantized.available()


def int8_gated(model_dir: Path | None) -> bool:
    """Whether int8's quality gates were measured on this model: the packaged all-MiniLM-L6-v2 (None: the default).
    auto picks int8 for no other model; `encoder.dtype: int8` runs any BERT-like one."""
    if model_dir is None:
        return True
    try:
        return Path(model_dir).resolve() == default_model_path().resolve()
    except ImportError:  # the packaged model is not installed: this folder is another
        return False


def choose_dtype(
    requested: DType, cuda: bool, precision: str | None = None, queries: bool = False, gated: bool = True
) -> tuple[DType, str]:
    """The engine's precision and why: fp16 on CUDA; on CPU bf16 where the CPU has native bf16 dot products, int8
    on other x86 CPUs with AVX2 (`cpu_runs_int8`) for a model whose int8 passed the quality gates (`gated`:
    `int8_gated`), else fp32. A requested precision is kept.
    `precision` ("int8" or "float") is an existing generation's, which wins: its vectors must stay comparable.
    `queries`: search's own engine, whose passes are a few short queries: on CPU it runs fp32 even where bf16 is
    native (torch lays a bf16 weight out anew at every matmul, which a pass of a few dozen tokens does not
    amortise: per query 4.1-4.9 ms in fp32 against 5.8-6.8 in bf16, batches of 8-32 queries of 16 tokens,
    one thread, AVX512_BF16), the same float vectors; the queries of an int8 generation, or of one that auto
    makes int8 (`precision` None), are int8."""
    if precision == "int8":
        return "int8", "the generation's vectors are int8"
    if queries and not cuda and (requested == "auto" or (requested == "int8" and precision == "float")):
        if precision is None and requested == "auto" and gated and cpu_runs_int8():
            return "int8", "auto makes the generation's vectors int8 on this CPU (AVX2, no native bf16)"
        return "fp32", "search's queries: short passes run faster in fp32 than in bf16 on CPU"
    if precision == "float" and requested in ("int8", "auto"):
        if cuda:
            return "fp16", "CUDA; the generation's vectors are float"
        return ("bf16" if cpu_has_native_bf16() else "fp32"), "the generation's vectors are float"
    if requested != "auto":
        return requested, f"configured (encoder.{'query_dtype or encoder.dtype' if queries else 'dtype'})"
    if cuda:
        return "fp16", "CUDA"
    if cpu_has_native_bf16():
        return "bf16", "the CPU has native bf16 dot products (avx512_bf16 or amx_bf16)"
    if gated and cpu_runs_int8():
        return "int8", "AVX2 without native bf16: int8 runs 1.2-1.3x fp32 there, within the quality gates"
    if not gated:
        return "fp32", "no native bf16 on this CPU (int8's quality gates were measured on the packaged model only)"
    return "fp32", "neither native bf16 nor AVX2 on this CPU (or no ONNX Runtime for int8)"


def model_window(model_dir: Path) -> int:
    """The model's window as sentence-transformers sets it: `max_seq_length`, else the tokenizer's
    `model_max_length`, never past the position embeddings."""

    def read(name: str) -> dict[str, Any]:
        path = model_dir / name
        return dict(json.loads(path.read_text())) if path.exists() else {}

    positions = int(read("config.json").get("max_position_embeddings", 512))
    length = read("sentence_bert_config.json").get("max_seq_length")
    if length is None:
        length = read("tokenizer_config.json").get("model_max_length")
    if not isinstance(length, int) or length > 100_000:  # transformers' "no limit" is a huge number
        length = positions
    return min(length, positions)


@dataclass
class HostBatch:
    """One forward pass, ready on the host: padded ids, lengths and output rows (pinned on CUDA)."""

    ids: Any  # torch int64 (n, width)
    lengths: Any  # torch int64 (n,)
    rows: Any  # torch int64 (n,)
    full: bool  # no padding: no attention mask needed


class EmbeddingEngine:
    """Mean-pooling transformer encoder over a sentence-transformers model folder (offline)."""

    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        dtype: DType = "auto",
        token_budget: int | None = None,
        macro_batch: int = 8192,
        compile: bool = False,
        tokenizer: TokenizerChoice = "auto",
        precision: str | None = None,
        nice: int = 0,
        threads: int | None = None,
        queries: bool = False,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.model_dir = Path(model_dir)
        self._name = model_name_of(self.model_dir)  # read once: it is on every query's path
        self.device = torch.device(resolve_device(device))
        self.cuda = self.device.type == "cuda"
        self.dtype_name, self.dtype_why = choose_dtype(dtype, self.cuda, precision, queries, int8_gated(model_dir))
        if self.dtype_name == "int8" and self.cuda:
            raise ValueError("encoder.dtype int8 runs on CPU only (ONNX Runtime's int8 kernels); use fp16 on CUDA")
        # int8: the weights are ONNX Runtime's; pooling and everything around the transformer stays fp32.
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}[
            self.dtype_name
        ]
        self.max_seq = model_window(self.model_dir)
        # CPU: big batches buy nothing and cost cache; CUDA: big batches keep the GPU busy.
        self.token_budget = token_budget or (65_536 if self.cuda else 4_096)
        self.macro_batch = macro_batch

        # flash-tokenizer's OpenMP threads would compete with torch's for a CPU run's cores.
        self.text_tokenizer = TextTokenizer.of_model(self.model_dir, self.max_seq, tokenizer, threads=self.cuda)
        self._hf_tokenizer: Any = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.pad_id = int(self._hf_tokenizer.pad_token_id or 0)
        self.cls_id = int(self._hf_tokenizer.cls_token_id)
        self.sep_id = int(self._hf_tokenizer.sep_token_id)

        # nice > 0: the forward passes and the host work run on threads of their own at that nice value (the
        # threads of their OpenMP team and of ONNX Runtime's pool are made by them, and inherit it), so a process's
        # other engine (search's) goes first on shared cores.
        self.nice = nice  # steps below the thread that made the engine (search's, in the node), at most 19
        self._nice_at = min(19, thread_nice() + nice)
        # threads: the forward thread's intra-op team, its own (torch's count is per thread; the process's stays).
        # The node's search engine runs with a team of one: a two-thread team on two cores shared with the writer's
        # engine waits at every op's barrier for whichever of its threads the writer's preempted (p99 stalls).
        self.threads = threads
        self._forward = self._worker("embed-forward") if nice > 0 or threads else None
        self.int8: Int8Model | None = None
        self.model: Any = None
        if self.dtype_name == "int8":
            artifact, team = quantized.artifact(self.model_dir), threads or torch.get_num_threads()
            self.int8 = self._on_forward(lambda: Int8Model(artifact, threads=team))
            self._dim = int(json.loads((self.model_dir / "config.json").read_text())["hidden_size"])
        else:
            model: Any = AutoModel.from_pretrained(
                str(self.model_dir), local_files_only=True, dtype=self.dtype, attn_implementation="sdpa"
            )
            self.model = model.to(self.device).eval()
            self._dim = int(model.config.hidden_size)
            if compile:
                self.model = torch.compile(self.model, dynamic=True)
        self._pool = self._worker("embed-host")
        self._lock = threading.Lock()  # one forward pipeline at a time (threads share the device)
        self.truncated = 0
        self.tokenized = 0  # texts this engine tokenized (ids handed in are not counted)

    # The Encoder protocol ------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector size."""
        return self._dim

    @property
    def max_tokens(self) -> int:
        """Content tokens per input (the special tokens take two)."""
        return self.max_seq - 2

    @property
    def tokenizer(self) -> Any:
        """The model's own (fast) tokenizer, for the chunker."""
        return self._hf_tokenizer

    @property
    def model_name(self) -> str:
        """The model's name, stable across machines and precisions."""
        return self._name

    @property
    def provider(self) -> str:
        """In this process."""
        return "local"

    @property
    def precision(self) -> str:
        """int8 or float (fp32, bf16 and fp16 give the same vectors to a cosine of 0.999)."""
        return "int8" if self.dtype_name == "int8" else "float"

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Texts -> L2-normalised float32 vectors of shape (n, dim). Text past the model's window is truncated,
        as sentence-transformers does, and counted in `truncated` (the chunker never sends such text)."""
        return self.encode_mixed(texts)

    def encode_ids(self, ids: Sequence[Sequence[int]], special: bool = False) -> Vectors:
        """Token ids (without [CLS]/[SEP] unless `special`) -> vectors; the chunker's ids need no second pass."""
        if special:
            return self._run([self.text_tokenizer.window(s) for s in ids], special=True)
        return self.encode_mixed(ids)

    def encode_mixed(self, items: Sequence[str | Sequence[int]]) -> Vectors:
        """Texts and content ids (no special tokens) in one call, in one batch plan: vectors in input order."""
        return self._run(items)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with special tokens, truncated to the model's window (batched, in C++ or Rust)."""
        seqs, cut = self.text_tokenizer(texts)
        self.truncated += cut
        self.tokenized += len(seqs)
        return seqs

    # The pipeline --------------------------------------------------------------------------------------------

    def _to_ids(self, items: Sequence[str | Sequence[int]]) -> list[list[int]]:
        """Ids with specials for every item: texts tokenized in one batched call, content ids wrapped."""
        texts = [i for i, x in enumerate(items) if isinstance(x, str)]
        seqs: list[list[int]] = [[] for _ in items]
        tokenized = self.tokenize([str(items[i]) for i in texts]) if texts else []
        for i, s in zip(texts, tokenized, strict=True):
            seqs[i] = s
        if len(texts) < len(items):
            keep = self.max_seq - 2
            for i, x in enumerate(items):
                if not isinstance(x, str):
                    seqs[i] = [self.cls_id, *x[:keep], self.sep_id]
                    self.truncated += len(x) > keep  # counted, as for text
        return seqs

    def _prepare(self, items: Sequence[str | Sequence[int]], special: bool) -> list[HostBatch]:
        """Host side of one macro-batch: ids, the batch plan, padded (pinned) tensors."""
        torch = self.torch
        # With specials given, an empty list still needs [CLS] [SEP]: an all-padding row would pool to NaN.
        seqs = [list(s) or [self.cls_id, self.sep_id] for s in items] if special else self._to_ids(items)
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        out: list[HostBatch] = []
        for batch in plan_batches(lengths.tolist(), self.token_budget, multiple=8 if self.cuda else 1):
            rows = np.asarray(batch.rows, dtype=np.int64)
            lens = lengths[rows]
            ids = torch.full((len(rows), batch.length), self.pad_id, dtype=torch.int64, pin_memory=self.cuda)
            keep = np.arange(batch.length)[None, :] < lens[:, None]
            flat = itertools.chain.from_iterable(seqs[i] for i in batch.rows)
            ids.numpy()[keep] = np.fromiter(flat, dtype=np.int64, count=int(lens.sum()))
            lens_t, rows_t = torch.from_numpy(lens), torch.from_numpy(rows)
            if self.cuda:
                lens_t, rows_t = lens_t.pin_memory(), rows_t.pin_memory()
            out.append(HostBatch(ids, lens_t, rows_t, full=bool(lens.min() == batch.length)))
        return out

    def _macros(self, items: Sequence[Any], special: bool) -> Iterator[tuple[int, list[HostBatch]]]:
        """Prepared macro-batches; the next one is prepared in a worker thread while the current one runs."""
        step = self.macro_batch
        if len(items) <= INLINE_ROWS:
            yield len(items), self._prepare(items, special)
            return
        pending: Future[list[HostBatch]] = self._pool.submit(self._prepare, items[:step], special)
        for start in range(0, len(items), step):
            current = pending.result()
            if start + step < len(items):
                pending = self._pool.submit(self._prepare, items[start + step : start + 2 * step], special)
            yield min(step, len(items) - start), current

    def _worker(self, name: str) -> ThreadPoolExecutor:
        """A thread of the engine's own, at its nice value, with its intra-op team."""
        nice = self._nice_at if self.nice > 0 else None
        if nice is None and self.threads is None:
            return ThreadPoolExecutor(1, thread_name_prefix=name)
        worker = ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_start_engine_thread, initargs=(nice, self.threads)
        )
        if self.threads is not None:
            # torch.set_num_threads on a new thread also sets the default of threads started later: set it back.
            # One engine at a time, so that none reads another's count as the process's.
            with _THREAD_COUNT:
                process_wide = self.torch.get_num_threads()
                worker.submit(self.torch.get_num_threads).result()  # started now, so the count is set back after it
                self.torch.set_num_threads(process_wide)
        return worker

    def _on_forward(self, work: Callable[[], T]) -> T:
        """`work()` on the forward thread (at the engine's nice value), or here when there is none."""
        return self._forward.submit(work).result() if self._forward is not None else work()

    def _run(self, items: Sequence[str | Sequence[int]], special: bool = False) -> Vectors:
        if not items:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._on_forward(lambda: self._run_here(items, special))

    def _run_here(self, items: Sequence[str | Sequence[int]], special: bool) -> Vectors:
        parts: list[Vectors] = []
        in_flight: tuple[Any, Any] | None = None  # (host result, event) of the macro-batch the device still runs
        with self._lock, self.torch.inference_mode():
            for n, batches in self._macros(items, special):
                launched = self._launch(n, batches)
                if in_flight is not None:
                    parts.append(self._collect(*in_flight))
                in_flight = launched
            assert in_flight is not None
            parts.append(self._collect(*in_flight))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _launch(self, n: int, batches: list[HostBatch]) -> tuple[Any, Any]:
        """Queue one macro-batch's forward passes; on CUDA nothing here waits for the device."""
        torch, dev = self.torch, self.device
        out = torch.empty((n, self._dim), dtype=torch.float32, device=dev)
        for b in batches:
            ids = b.ids.to(dev, non_blocking=True)
            lens = b.lengths.to(dev, non_blocking=True)
            rows = b.rows.to(dev, non_blocking=True)
            keep = torch.arange(ids.shape[1], device=dev)[None, :] < lens[:, None]
            # A 4-D mask is used as given (no `mask.all()` check, which would sync); none at all without padding.
            if self.int8 is not None:
                hidden = torch.from_numpy(self.int8(ids.numpy(), keep.to(torch.int64).numpy()))
            else:
                mask = None if b.full else keep[:, None, None, :]
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            summed = (hidden.to(torch.float32) * keep.unsqueeze(-1)).sum(1)
            pooled = torch.nn.functional.normalize(summed / lens.unsqueeze(-1).to(torch.float32), p=2, dim=1)
            out.index_copy_(0, rows, pooled)
        if not self.cuda:
            return out, None
        host = torch.empty((n, self._dim), dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(dev))  # the engine's device, whichever one is current
        return host, done

    @staticmethod
    def _collect(host: Any, done: Any) -> Vectors:
        if done is not None:
            done.synchronize()
        result: Vectors = host.numpy().copy() if done is not None else host.numpy()
        return result

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=False)
        if self._forward is not None:
            self._forward.shutdown(wait=False)
