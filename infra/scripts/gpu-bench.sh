#!/usr/bin/env bash
# The embedding engine on the GPU box, in one command: the CUDA tests, then `bench embed` side by side.
#
# Runs from the repository root on a machine that has torch, transformers and sentence-transformers but no
# registry and no hub. Prepare here with `make gpu-kit` (the fp16 model folder and the flash-tokenizer wheel
# under .cache), then, through the device tool:
#   run(command="bash infra/scripts/gpu-bench.sh tests", carry=[".cache/models", ".cache/gpu-wheels"], timeout_s=600)
#   run(command="bash infra/scripts/gpu-bench.sh bench", carry=[".cache/models", ".cache/gpu-wheels"], timeout_s=600)
# Results land in $OUT (the device tool brings them back): gpu.txt, gpu-tests.log, embed-cuda-*.json, bench.log.
# N (chunks, default 100000) and BENCH_ARGS (e.g. --compile) tune the benchmark; PYTHON and DEVICE=cpu try the
# script itself on a machine without a GPU.
set -uo pipefail
WHAT=${1:-all}  # tests | bench | all (each fits one device call of 10 minutes on its own; both together may not)
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODEL=${RAGTIDE_GPU_MODEL:-.cache/models/all-MiniLM-L6-v2-fp16}
if compgen -G ".cache/gpu-wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ragtide-site \
    .cache/gpu-wheels/*.whl && export PYTHONPATH=/tmp/ragtide-site \
    || echo "carried wheels did not install: the engine will use the Rust tokenizer alone" >&2
fi
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" RAGTIDE_GPU_MODEL="$MODEL" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -d "$MODEL" ] || { echo "no model folder $MODEL: run 'make gpu-kit' and carry .cache/models" >&2; exit 1; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  "$PY" -c 'import torch, transformers, sentence_transformers as st; print(torch.__version__, torch.version.cuda, transformers.__version__, st.__version__)'
} 2>&1 | tee "$OUT/gpu.txt"
tests=0 bench=0
if [ "$WHAT" != bench ] && [ "${DEVICE:-cuda}" = cuda ]; then
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
  tests=${PIPESTATUS[0]}
fi
if [ "$WHAT" != tests ]; then
  timeout "${BENCH_TIMEOUT:-540}" "$PY" -m ragtide.bench.embed --model "$MODEL" --device "${DEVICE:-cuda}" \
    --n "${N:-100000}" --repeats 2 --out "$OUT" ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "gpu tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
