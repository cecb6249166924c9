"""int8 weights for CPUs without native bf16: the packaged model, quantized once into a cached ONNX artifact and run
by ONNX Runtime's int8 kernels (MLAS: AVX2 `vpmaddubsw`, VNNI where the CPU has it).

The recipe, measured on a 2-core AVX2-only EPYC against torch's own dynamic quantization (fbgemm): export the
transformer (eager attention, so the padding mask stays in the graph), fuse it with ONNX Runtime's BERT optimizer
(attention, skip-LayerNorm, bias-GELU), then quantize every MatMul dynamically, int8 weights per output channel
(per-tensor weights lose too much: mean cosine to fp32 0.94). That ran 1.4-1.5x torch fp32 at a mean cosine of 0.99 to
fp32; torch's fbgemm path ran 1.3x at 0.976.

The artifact is built from the model folder on this machine, never downloaded. It is cached under
`~/.cache/ragtide/int8/` (or `$RAGTIDE_CACHE_DIR/int8/`: point it at a volume in containers, or each new
container builds it again, ~20 s) by a hash of the model's files, the recipe and the versions of the libraries
that build it; concurrent builders (several processes starting at once) wait on a file lock (local filesystems),
and a finished artifact is renamed into place, so no process ever loads half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

RECIPE = "onnx-bert-fused-dynamic-qint8-per-channel-v1"


def available() -> bool:
    """ONNX Runtime and the ONNX exporter's dependencies are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_root() -> Path:
    """Where built artifacts live."""
    base = os.environ.get("RAGTIDE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "ragtide") / "int8"


def artifact_key(model_dir: Path) -> str:
    """A hash of what decides the artifact: the model's files, the recipe, and the building libraries' versions."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    versions = f"{torch.__version__}|{transformers.__version__}|{onnx.__version__}|{onnxruntime.__version__}"
    h = hashlib.sha256(f"{RECIPE}|{versions}".encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def artifact(model_dir: Path, root: Path | None = None) -> Path:
    """The int8 ONNX file for `model_dir`: built here once, then reused."""
    root = root or cache_root()
    target = root / artifact_key(model_dir) / "model.int8.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if not target.exists():
            for stale in target.parent.glob("tmp*"):  # a builder killed mid-way (we hold the lock: none runs)
                shutil.rmtree(stale, ignore_errors=True)
            started = time.monotonic()
            build(model_dir, target)
            log.info(
                "int8 model built",
                extra={"path": str(target), "seconds": round(time.monotonic() - started, 1), "recipe": RECIPE},
            )
    return target


def build(model_dir: Path, target: Path) -> None:
    """Export, fuse and quantize `model_dir` into `target` (written atomically)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    config = json.loads((model_dir / "config.json").read_text())
    model = AutoModel.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()  # fp32 whatever the folder holds: the quantizer takes float weights

    class Hidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.full((2, 16), 1000, dtype=torch.int64)
    mask = torch.ones((2, 16), dtype=torch.int64)
    mask[1, 9:] = 0  # traced with padding: a mask-free trace would drop the mask from the graph
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        exported, fused, quantized = (Path(tmp) / n for n in ("fp32.onnx", "fused.onnx", "int8.onnx"))
        with torch.inference_mode():
            torch.onnx.export(
                Hidden(model),
                (ids, mask),
                str(exported),
                input_names=["input_ids", "attention_mask"],
                output_names=["hidden"],
                dynamic_axes={name: {0: "rows", 1: "tokens"} for name in ("input_ids", "attention_mask", "hidden")},
                opset_version=17,
                dynamo=False,
            )
        optimized = optimize_model(
            str(exported),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            opt_level=1,
        )
        optimized.save_model_to_file(str(fused))
        quantize_dynamic(
            str(fused),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": 1},  # fused ops' outputs are float (ONNX's FLOAT)
        )
        os.replace(quantized, target)


class Int8Model:
    """The int8 transformer: (ids, mask) as int64 arrays (rows, tokens) -> last hidden state (rows, tokens, dim)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning: on a small machine the cores are shared with Kafka and Postgres.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out
