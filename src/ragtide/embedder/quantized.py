"""int8 weights for CPUs without native bf16: the packaged model, quantized once into a cached ONNX artifact and run
by ONNX Runtime's int8 kernels (MLAS: AVX2 `vpmaddubsw`, VNNI where the CPU has it).

The recipe, measured on a 2-core AVX2-only EPYC against torch's own dynamic quantization (fbgemm): export the
transformer (eager attention, so the padding mask stays in the graph), fuse it with ONNX Runtime's BERT optimizer
(attention, skip-LayerNorm, bias-GELU), then quantize the MatMuls dynamically, int8 weights per output channel
(per-tensor weights lose too much: mean cosine to fp32 0.94). That ran 1.4-1.5x torch fp32 at a mean cosine of 0.99 to
fp32; torch's fbgemm path ran 1.3x at 0.976.

Before quantizing, the projections that read a LayerNorm's output (the attention's QKV and the FFN's first layer)
are smoothed (SmoothQuant, Xiao et al. 2023): a few channels of a LayerNorm's output run far larger than the rest,
so one scale per activation tensor rounds the others coarsely. Each input channel j is divided by
s_j = max|x_j|^0.5 / max|w_j|^0.5 (an element-wise Mul in front of the projection) and the weight's row j is
multiplied by it: the same function in floats, a flatter activation for int8. The channel maxima come from a
calibration pass of the fp32 graph over docstrings of Python's standard library (not the corpora the quality gates
measure on). On the demo corpus's top-10 it lifted the overlap with fp32 from 0.89 to 0.91-0.93 (by the texts
drawn) at the same speed (smoothing the FFN's second layer and the attention output too made it worse).

Then each MatMul (the attention's output projection and the FFN's two layers) is scaled per token: its input
divided by each token's largest |value|, its output multiplied back (`scale_per_token`). The dynamic quantizer's
one scale per tensor then fits every token, not only the few with the largest activations. Only MatMuls are
quantized: the attention's QKV projection stays fp32 (inside ONNX Runtime's fused Attention, whose int8 form
quantizes per tensor, with the bias inside), and so do the word embeddings (the recipe before quantized their
table too): the artifact is 66 MB instead of 23. The QKV's smoothing Mul stays, though it now changes nothing
(in floats it is the same function): it is the recipe as measured. On the demo corpus that lifts the top-10
overlap with fp32 from 0.9125 to 0.953 (the gate is 0.95; mean cosine 0.998) for 1.2-1.3x torch fp32 instead of
1.5-1.6x (2-core AVX2-only EPYC, `avx2 fma`).

Since every int8 MatMul's input then spans [-1, 1], it is quantized with one fixed scale and zero point, the ones
the dynamic quantizer picks for that span (`fix_activation_scales`), not with the min and max of the whole batch:
a text's vector no longer depends on the other texts it was embedded with (it moved up to 5e-3 an element), so a
row embedded alone on an update gets the vector the backfill gave it. Same speed, same gates.

The weights are 7-bit on x86 (ONNX Runtime's `reduce_range`). Without VNNI, MLAS multiplies with `vpmaddubsw`,
which adds two u8 x s8 products into an int16 and saturates past 32767 (255 x 127 x 2 = 64770): there the
8-bit artifact of the recipe before this one measured a mean cosine to fp32 of 0.979 and an overlap of 0.856,
the 7-bit one 0.994 and 0.9125. With VNNI (`vpdpbusd` adds into int32) nothing saturates, and 7 bits there too
make every x86 CPU compute the same exact integer products (the float parts, QKV, LayerNorm, GELU, softmax, run
other kernels on AVX-512 than on AVX2, so vectors differ in float rounding only), and the gates measured on one
CPU carry over to the others. The bits are part of the artifact's key.

The artifact is built from the model folder on this machine, never downloaded. It is cached under
`~/.cache/ragtide/int8/` (or `$RAGTIDE_CACHE_DIR/int8/`: point it at a volume in containers, or each new
container builds it again, ~30 s) by a hash of the model's files, the recipe and the versions of the libraries
that build it; concurrent builders (several processes starting at once) wait on a file lock (local filesystems),
and a finished artifact is renamed into place, so no process ever loads half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

RECIPE = "onnx-bert-fused-smoothquant-per-token-matmuls-qkv-fp32-fixed-scale-qint8-per-channel-v5"
# Inputs scaled per token span [-1, 1]: quantized with the scale and zero point ONNX Runtime's dynamic quantizer picks
# for that span ((1 - -1) / 255 and 128), fixed, so that no other text in the batch moves them.
ACTIVATION_SCALE, ACTIVATION_ZERO_POINT = 2 / 255, 128
SMOOTHING = 0.5  # SmoothQuant's alpha: how much of an activation channel's range moves into the weights
CALIBRATION_MODULES = tuple(  # their docstrings calibrate the smoothing
    "argparse asyncio collections csv datetime decimal email.message functools http.client itertools json logging "
    "os pathlib re shutil socket sqlite3 ssl subprocess tempfile threading typing unittest urllib.parse zipfile".split()
)
CALIBRATION_TEXTS = 512


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


def weight_bits() -> int:
    """7 on x86 (every x86 CPU: where `vpmaddubsw`'s int16 sums would saturate, and where VNNI would not, so that
    both compute the same exact integer products), 8 elsewhere."""
    return 7 if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") else 8


def artifact_key(model_dir: Path, bits: int) -> str:
    """A hash of what decides the artifact: the model's files, the recipe, its weights' bits, and the building
    libraries' versions."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    versions = f"{torch.__version__}|{transformers.__version__}|{onnx.__version__}|{onnxruntime.__version__}"
    versions += f"|{platform.python_version()}"  # the calibration texts are its standard library's docstrings
    recipe = f"{RECIPE}|{SMOOTHING}|{CALIBRATION_TEXTS}|{','.join(CALIBRATION_MODULES)}"
    recipe += f"|weights{bits}"
    h = hashlib.sha256(f"{recipe}|{versions}".encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def artifact(model_dir: Path, root: Path | None = None, bits: int | None = None) -> Path:
    """The int8 ONNX file for `model_dir`: built here once, then reused. `bits`: the weights', 7 or 8 (default:
    `weight_bits()`, by this CPU's architecture)."""
    root = root or cache_root()
    bits = weight_bits() if bits is None else bits
    if bits not in (7, 8):
        raise ValueError(f"int8 weights are 7 or 8 bits, not {bits}")
    target = root / artifact_key(model_dir, bits) / "model.int8.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if not target.exists():
            for stale in target.parent.glob("tmp*"):  # a builder killed mid-way (we hold the lock: none runs)
                shutil.rmtree(stale, ignore_errors=True)
            started = time.monotonic()
            build(model_dir, target, bits)
            log.info(
                "int8 model built",
                extra={
                    "path": str(target),
                    "seconds": round(time.monotonic() - started, 1),
                    "recipe": RECIPE,
                    "weight_bits": bits,
                },
            )
    return target


def build(model_dir: Path, target: Path, bits: int) -> None:
    """Export, fuse, smooth, scale per token and quantize `model_dir` into `target` (written atomically), with 8-
    or 7-bit weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fused, quantized = Path(tmp) / "fused.onnx", Path(tmp) / "int8.onnx"
        optimized = fused_graph(model_dir, Path(tmp))
        smooth_layernorm_inputs(optimized.model, calibration_batches(model_dir), SMOOTHING)
        scale_per_token(optimized.model)
        optimized.save_model_to_file(str(fused))
        quantize_dynamic(
            str(fused),
            str(quantized),
            op_types_to_quantize=["MatMul"],  # the fused Attention (QKV) stays fp32
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=bits == 7,
            extra_options={"DefaultTensorType": 1},  # fused ops' outputs are float (ONNX's FLOAT)
        )
        model = onnx.load(str(quantized))
        fix_activation_scales(model)
        onnx.save(model, str(quantized))
        os.replace(quantized, target)


def scale_per_token(model: Any) -> None:
    """In place: each MatMul with a constant weight (in a fused BERT graph: the attention's output projection and
    the FFN's two layers; their biases live in the fused ops after them) gets its input divided by each token's
    largest |value| and its output multiplied back by it. The same function in floats; the dynamic quantizer's one
    scale per tensor then sees every token in [-1, 1], so a few tokens with large activations no longer round the
    rest coarsely (what per-token scales do, with ONNX Runtime's fused int8 MatMul kept)."""
    import onnx
    from onnx import numpy_helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > 17:  # ReduceMax's axes became an input in opset 18
        raise ValueError(f"int8: per-token scales are written for ONNX opset <= 17, the graph has {opset}")
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    eps = numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "per_token/eps")
    graph.initializer.append(eps)
    ordered = []
    scaled = 0
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weights:
            p, x = f"per_token_{scaled}/{node.name}", node.input[0]
            ordered += [
                onnx.helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/Abs"),
                onnx.helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/peak"], name=f"{p}/ReduceMax", axes=[-1]),
                onnx.helper.make_node("Max", [f"{p}/peak", eps.name], [f"{p}/scale"], name=f"{p}/Max"),
                onnx.helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/input"], name=f"{p}/Div"),
            ]
            out = node.output[0]
            node.input[0], node.output[0] = f"{p}/input", f"{p}/output"
            ordered += [node, onnx.helper.make_node("Mul", [f"{p}/output", f"{p}/scale"], [out], name=f"{p}/Mul")]
            scaled += 1
        else:
            ordered.append(node)
    if not scaled:
        raise ValueError("int8: no MatMul with a constant weight to scale; is this a fused BERT graph?")
    del graph.node[:]
    graph.node.extend(ordered)


def fix_activation_scales(model: Any) -> None:
    """In place, on the quantized graph: each DynamicQuantizeLinear (the int8 MatMuls' inputs, already scaled per
    token into [-1, 1]) becomes a QuantizeLinear with the fixed `ACTIVATION_SCALE` and `ACTIVATION_ZERO_POINT`.
    The dynamic quantizer takes its range from the whole batch's min and max: a text's vector moved (up to 5e-3 an
    element) with the other texts it was embedded with. Fixed, a text gets the same vector alone or in any batch,
    at the same speed (ONNX Runtime fuses QuantizeLinear + MatMulInteger as it fused the dynamic form)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    scale = numpy_helper.from_array(np.array(ACTIVATION_SCALE, dtype=np.float32), "fixed_activation/scale")
    zero = numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, dtype=np.uint8), "fixed_activation/zero_point")
    graph.initializer.extend([scale, zero])
    renamed: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            x, (q, node_scale, node_zero) = node.input[0], node.output
            nodes.append(onnx.helper.make_node("QuantizeLinear", [x, scale.name, zero.name], [q], name=node.name))
            renamed |= {node_scale: scale.name, node_zero: zero.name}
        else:
            nodes.append(node)
    if not renamed:
        raise ValueError("int8: no DynamicQuantizeLinear to fix; did quantize_dynamic quantize any MatMul?")
    for node in nodes:
        inputs = [renamed.get(name, name) for name in node.input]
        del node.input[:]
        node.input.extend(inputs)
    del graph.node[:]
    graph.node.extend(nodes)


def fused_graph(model_dir: Path, workdir: Path) -> Any:
    """The model's transformer in fp32, exported to ONNX under `workdir` and fused by ONNX Runtime's BERT optimizer
    (its OnnxModel: `.model` is the graph)."""
    import torch
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
    exported = workdir / "fp32.onnx"
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
    return optimize_model(
        str(exported),
        model_type="bert",
        num_heads=int(config["num_attention_heads"]),
        hidden_size=int(config["hidden_size"]),
        opt_level=1,
    )


def calibration_texts(n: int = CALIBRATION_TEXTS) -> list[str]:
    """`n` paragraphs of the standard library's docstrings: the same for one Python version whatever this process
    imported before (a submodule imported elsewhere becomes an attribute of its package: modules are left out)."""
    import importlib
    import inspect

    paragraphs: list[str] = []
    for name in CALIBRATION_MODULES:
        module = importlib.import_module(name)
        public = [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(o) or "" for o in public if not inspect.ismodule(o)]
        paragraphs += [p.strip()[:1500] for d in docs for p in d.split("\n\n") if len(p.strip()) > 20]
    distinct = list(dict.fromkeys(paragraphs))
    if not distinct:
        raise RuntimeError(
            "int8: no docstrings to calibrate with (Python runs with -OO); build the artifact without it"
        )
    return distinct[:: max(1, len(distinct) // n)][:n]


def calibration_batches(model_dir: Path, rows: int = 16) -> list[dict[str, npt.NDArray[np.int64]]]:
    """The calibration texts as the graph's inputs: padded batches of ids and attention masks."""
    from transformers import AutoTokenizer

    from ragtide.embedder.engine import model_window  # the engine imports this module

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    window = model_window(model_dir)
    texts = calibration_texts()
    batches = []
    for start in range(0, len(texts), rows):
        enc = tokenizer(
            texts[start : start + rows], truncation=True, max_length=window, padding=True, return_tensors="np"
        )
        batches.append({name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask")})
    return batches


def smooth_layernorm_inputs(model: Any, batches: list[dict[str, npt.NDArray[np.int64]]], alpha: float) -> None:
    """SmoothQuant, in place, on a fused BERT graph: every int8-bound projection whose input is a LayerNorm's output
    (an Attention node's QKV, a MatMul after a (Skip)LayerNormalization) gets its input divided per channel by s and
    its weight rows multiplied by s, with s from the channel maxima over `batches` (the fp32 graph's own run)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = Counter(name for node in graph.node for name in node.input)
    layernorms = {"LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"}
    targets = [
        node
        for node in graph.node
        if node.op_type in ("Attention", "MatMul")
        and len(node.input) > 1
        and node.input[1] in weights
        and readers[node.input[1]] == 1  # a weight another node reads too would be scaled under it as well
        and node.input[0] in producer
        and producer[node.input[0]].op_type in layernorms
    ]
    if not targets:
        raise ValueError("int8: no LayerNorm-fed projection found to smooth; is this a fused BERT graph?")
    peak = channel_peaks(model, batches, sorted({node.input[0] for node in targets}))
    mul_before: dict[int, Any] = {}  # by the projection's id: node names may be empty or repeat
    for i, node in enumerate(targets):
        w = numpy_helper.to_array(weights[node.input[1]])
        x_peak = np.maximum(peak[node.input[0]], 1e-5)
        w_peak = np.maximum(np.abs(w).max(axis=1), 1e-5)
        s = np.clip(x_peak**alpha / w_peak ** (1 - alpha), 1e-3, 1e3).astype(np.float32)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
        prefix = f"smooth_{i}/{node.name}"
        inverse = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{prefix}/inverse")
        graph.initializer.append(inverse)
        mul_before[id(node)] = onnx.helper.make_node(
            "Mul", [node.input[0], inverse.name], [f"{prefix}/input"], name=f"{prefix}/smooth"
        )
        node.input[0] = f"{prefix}/input"
    ordered = []
    for node in graph.node:  # each Mul right before its projection: the graph stays topologically sorted
        if id(node) in mul_before:
            ordered.append(mul_before[id(node)])
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


def channel_peaks(model: Any, batches: list[dict[str, npt.NDArray[np.int64]]], names: list[str]) -> dict[str, Any]:
    """The largest |value| of each channel (last axis) of the graph's tensors `names` over `batches`, padding
    positions left out (an fp32 run of the graph with those tensors as extra outputs)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    peak: dict[str, Any] = {}
    for feed in batches:
        got = dict(zip(names, session.run(names, feed), strict=True))
        real = feed["attention_mask"].astype(bool)  # padding positions carry no text
        for name in names:
            m = np.abs(got[name][real]).max(axis=0)
            peak[name] = m if name not in peak else np.maximum(peak[name], m)
    return peak


def session_options(threads: int) -> Any:
    """ONNX Runtime's options for the int8 model's session (and for `bench embed`'s MatMul timing): an intra-op team
    of `threads`, one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: on a small machine the cores are shared with Kafka and Postgres.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Int8Model:
    """The int8 transformer: (ids, mask) as int64 arrays (rows, tokens) -> last hidden state (rows, tokens, dim)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])

    def __call__(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out
