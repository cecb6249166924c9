"""The embedding engine: a sentence-transformers-compatible mean-pooling encoder without sentence-transformers'
per-call overhead. Imports only torch, transformers/tokenizers and numpy, so it runs anywhere torch does.

What it does differently from `SentenceTransformer.encode`:
- Token ids in, not only text: token-aware chunking already tokenized every chunk with the same tokenizer, so
  the engine accepts those ids (`encode_ids`) and never tokenizes twice. Text goes through the Rust fast
  tokenizer in large `encode_batch` calls.
- Token-budget batching: inputs are sorted by length and cut into batches whose padded size (rows x longest)
  stays under a token budget, so short inputs travel in big batches, long ones in small, and padding stays small.
- On CUDA: fp16 (or bf16) weights, pooling in fp32, pinned host buffers with non-blocking copies, and the next
  macro-batch tokenized in a worker thread while the GPU runs the current one; one device->host copy per
  macro-batch. On CPU: bf16 where the CPU has native bf16 dot products (AVX512_BF16 / AMX), else fp32; the
  same batching (a 4,096-token budget: larger padded batches are slower on CPU caches).

Vectors are L2-normalised mean pools of the last hidden state, the same as the model's sentence-transformers
pipeline (Transformer -> Pooling(mean) -> Normalize); a parity test holds cosine >= 0.999 against it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ragtide.embedder.encoder import model_name_of

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
DType = Literal["auto", "fp32", "fp16", "bf16"]


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
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.model_dir = Path(model_dir)
        self._name = model_name_of(self.model_dir)  # read once: it is on every query's path
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if dtype == "auto":
            dtype = "fp16" if self.cuda else ("bf16" if cpu_has_native_bf16() else "fp32")
        self.dtype_name: DType = dtype
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.max_seq = self._max_seq_length()
        # CPU: big batches buy nothing and cost cache; CUDA: big batches keep the GPU busy.
        self.token_budget = token_budget or (65_536 if self.cuda else 4_096)
        self.macro_batch = macro_batch

        self._fast: Any = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self._fast.no_padding()
        self._fast.enable_truncation(self.max_seq)
        self._hf_tokenizer: Any = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.pad_id = int(self._hf_tokenizer.pad_token_id or 0)
        self.cls_id = int(self._hf_tokenizer.cls_token_id)
        self.sep_id = int(self._hf_tokenizer.sep_token_id)

        model: Any = AutoModel.from_pretrained(
            str(self.model_dir), local_files_only=True, dtype=self.dtype, attn_implementation="sdpa"
        )
        self.model: Any = model.to(self.device).eval()
        self._dim = int(model.config.hidden_size)
        if compile:
            self.model = torch.compile(self.model, dynamic=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._lock = threading.Lock()  # one forward pipeline at a time (threads share the device)
        self.truncated = 0

    def _max_seq_length(self) -> int:
        cfg = self.model_dir / "sentence_bert_config.json"
        if cfg.exists():
            return int(json.loads(cfg.read_text()).get("max_seq_length", 512))
        return 512

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

    def encode(self, texts: Sequence[str]) -> Vectors:
        """Texts -> L2-normalised float32 vectors of shape (n, dim). Text past the model's window is truncated,
        as sentence-transformers does, and counted in `truncated` (the chunker never sends such text)."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._run(self._macro(list(texts)))

    def encode_ids(self, ids: Sequence[Sequence[int]], special: bool = False) -> Vectors:
        """Token ids (without [CLS]/[SEP] unless `special`) -> vectors; the chunker's ids need no second pass."""
        if special:  # keep the final [SEP] when cutting to the model's window
            seqs = [[*s[: self.max_seq - 1], s[-1]] if len(s) > self.max_seq else list(s) for s in ids]
        else:
            seqs = [[self.cls_id, *s[: self.max_seq - 2], self.sep_id] for s in ids]
        if not seqs:
            return np.zeros((0, self._dim), dtype=np.float32)
        return self._run(iter([seqs]))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with special tokens, truncated to the model's window (batched, in Rust)."""
        encs = self._fast.encode_batch(list(texts), add_special_tokens=True)
        out = [e.ids for e in encs]
        self.truncated += sum(1 for e in encs if e.overflowing)
        return out

    # The pipeline --------------------------------------------------------------------------------------------

    def _macro(self, texts: list[str]) -> Iterator[list[list[int]]]:
        """Tokenized macro-batches; the next one is tokenized in a worker thread while the current one runs."""
        step = self.macro_batch
        pending: Future[list[list[int]]] = self._pool.submit(self.tokenize, texts[:step])
        for start in range(step, len(texts) + step, step):
            current = pending.result()
            if start < len(texts):
                pending = self._pool.submit(self.tokenize, texts[start : start + step])
            yield current

    def _run(self, macros: Iterator[list[list[int]]]) -> Vectors:
        parts = []
        with self._lock, self.torch.inference_mode():
            for seqs in macros:
                parts.append(self._forward_all(seqs))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _forward_all(self, seqs: list[list[int]]) -> Vectors:
        torch = self.torch
        out = torch.empty((len(seqs), self._dim), dtype=torch.float32, device=self.device)
        lengths = [len(s) for s in seqs]
        for batch in plan_batches(lengths, self.token_budget, multiple=8 if self.cuda else 1):
            n, width = len(batch.rows), batch.length
            ids = np.full((n, width), self.pad_id, dtype=np.int64)
            mask = np.zeros((n, width), dtype=np.int64)
            for r, i in enumerate(batch.rows):
                ids[r, : lengths[i]] = seqs[i]
                mask[r, : lengths[i]] = 1
            ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
            if self.cuda:
                ids_t = ids_t.pin_memory().to(self.device, non_blocking=True)
                mask_t = mask_t.pin_memory().to(self.device, non_blocking=True)
            hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            m = mask_t.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[torch.as_tensor(batch.rows, device=self.device)] = pooled
        result: Vectors = out.cpu().numpy()
        return result

    def close(self) -> None:
        """Stop the tokenizer thread."""
        self._pool.shutdown(wait=False)
