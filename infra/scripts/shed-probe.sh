#!/usr/bin/env bash
# The admission edge's shed path alone, under a flood: the API over test doubles (no stack), one search holding
# the only place (api.max_in_progress 1; its model pass never ends), and wrk at 1,024 connections, so that every
# other search is answered 503. Run once per HTTP parser (and event loop), side by side, on loopback.
#   infra/scripts/shed-probe.sh [seconds per run, default 8]
# Needs wrk (infra/scripts/system-deps.sh) and `make install`. Prints each run's rate and latency; compare only
# within one run of this script.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
SECONDS_PER_RUN=${1:-8}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/app.py" <<'PY'
import sys, time
import uvicorn
from prometheus_client import CollectorRegistry
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.gateway.gateway import Gateway
from ragtide.gateway.store import MemoryGatewayStore
from ragtide.ingest.sources import SourcesConfig
from ragtide.retriever.app import create_app
from tests.doubles import HashEncoder

class Held(HashEncoder):
    def encode_queries(self, texts, *args, **kwargs):
        time.sleep(3600)  # the one admitted search holds its place for the whole probe
        return super().encode(texts)

sources = SourcesConfig.model_validate({"sources": [{"table": "public.docs", "key": ["id"], "text": "{body}"}]})
index, encoder = MemoryIndex(), Held()
index.ensure_collection(encoder.dim)
settings = load_settings(RagtideSettings, api={"max_in_progress": 1, "queue_timeout_s": 3600}, canary={"enabled": False})
gateway = Gateway(settings.gateway, MemoryGatewayStore())
app = create_app(settings, index, encoder, sources, registry=CollectorRegistry(), gateway=gateway)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], loop=sys.argv[3], log_level="warning")
PY
cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"query": "shed me"}'
wrk.headers["Content-Type"] = "application/json"
LUA
probe() { # http loop
  local port
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  PYTHONPATH=$ROOT/src:$ROOT "$PY" "$WORK/app.py" "$port" "$1" "$2" > "$WORK/$1-$2.log" 2>&1 &
  local pid=$!
  for _ in $(seq 150); do curl -s -o /dev/null "127.0.0.1:$port/healthz" && break; sleep 0.2; done
  curl -s -m $((SECONDS_PER_RUN + 20)) -X POST -H 'content-type: application/json' -d '{"query": "hold"}' \
    "127.0.0.1:$port/v1/search" > /dev/null &
  sleep 1
  echo "== http=$1 loop=$2"
  wrk -t2 -c1024 -d"${SECONDS_PER_RUN}s" --timeout 5s -s "$WORK/post.lua" --latency "http://127.0.0.1:$port/v1/search" \
    | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
probe h11 asyncio
probe httptools asyncio
if "$PY" -c 'import uvloop' 2>/dev/null; then probe httptools uvloop; fi
