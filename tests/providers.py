"""Real OpenAI-compatible embeddings servers for the provider tests: ragtide's own `serve-embeddings` in a process
of its own, and a fault proxy in front of it that injects what providers do under load (429 with Retry-After,
5xx, a response slower than the client's timeout, a short vector list, an outage, a refused input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from ragtide.stack.process import free_port

MODEL = "all-MiniLM-L6-v2"


@contextmanager
def embeddings_server(tmp: Path, **env: str) -> Iterator[str]:
    """`ragtide serve-embeddings` on a free port (the packaged model, its own data folder, no Postgres needed);
    yields its base URL (…/v1)."""
    port = free_port()
    log = (tmp / "serve-embeddings.log").open("w")
    environ = {
        **os.environ,
        "RAGTIDE_API__PORT": str(port),
        "RAGTIDE_DATA_DIR": str(tmp / "embeddings-server"),
        "RAGTIDE_POSTGRES__PORT": str(free_port()),  # nothing there: dev-mode gateway, keys not needed
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "ragtide", "serve-embeddings"], env=environ, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve-embeddings did not start:\n{(tmp / 'serve-embeddings.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class FaultProxy:
    """Forwards POST …/embeddings to `upstream`, except for the faults queued in `faults` (one per request, in
    order): "429" (Retry-After: 1), "500", "slow" (answers after `slow_s`), "short" (the real answer less its last
    vector). While `down` is set every request gets a 503. A text containing `refuse` gets a 400, as a provider
    refuses an input it cannot embed. `seen` counts what was injected."""

    def __init__(self, upstream: str, slow_s: float = 3.0, refuse: str = "\x00never") -> None:
        self.upstream = upstream.rstrip("/")
        self.slow_s = slow_s
        self.refuse = refuse
        self.faults: list[str] = []
        self.down = False
        self.seen: Counter[str] = Counter()
        self.keys: list[str | None] = []  # the Authorization header of each request
        self.formats: list[str | None] = []  # the encoding_format each request asked for
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, headers, payload = proxy.handle(self.path, body, dict(self.headers))
                self.send_response(status)
                for k, v in {**headers, "content-length": str(len(payload))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        texts = json.loads(body).get("input", [])
        with self._lock:
            self.keys.append(headers.get("Authorization"))
            self.formats.append(json.loads(body).get("encoding_format"))
            fault = "down" if self.down else self.faults.pop(0) if self.faults else None
            if fault is None and any(self.refuse in t for t in ([texts] if isinstance(texts, str) else texts)):
                fault = "refused"
            if fault is not None:
                self.seen[fault] += 1
        error = {"content-type": "application/json"}
        if fault == "429":
            return 429, {**error, "Retry-After": "1"}, b'{"error": {"message": "rate limited"}}'
        if fault in {"500", "down"}:
            code = 500 if fault == "500" else 503
            return code, error, b'{"error": {"message": "injected"}}'
        if fault == "refused":
            return 400, error, b'{"error": {"message": "this input cannot be embedded"}}'
        if fault == "slow":
            time.sleep(self.slow_s)
        auth = {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}
        upstream = self._client.post(
            f"{self.upstream}{path.removeprefix('/v1')}",
            content=body,
            headers={"content-type": "application/json", **auth},
        )
        payload = upstream.content
        if fault == "short" and upstream.status_code == 200:
            doc = upstream.json()
            doc["data"] = doc["data"][:-1]
            payload = json.dumps(doc).encode()
        return upstream.status_code, {"content-type": "application/json"}, payload

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()
