"""The freshness benchmark's workload definition."""

from __future__ import annotations

import json
import random
import shutil
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ragtide.bench.workload import DEFAULT_MIX, parse_mix, sentence


def test_parse_mix() -> None:
    assert parse_mix("50:20:15:15") == DEFAULT_MIX
    assert parse_mix("1:0:0:0") == {"update": 1, "insert": 0, "meta": 0, "delete": 0}
    for bad in ("50:20:15", "a:b:c:d", "0:0:0:0", "-1:2:3:4"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)


def test_sentences_are_30_to_80_words_and_deterministic() -> None:
    lengths = {len(sentence(random.Random(i)).split()) for i in range(200)}
    assert min(lengths) >= 30 and max(lengths) <= 80
    assert sentence(random.Random(1)) == sentence(random.Random(1))


def test_bench_serve_targets_loopback_only() -> None:
    from ragtide.bench.serve import require_loopback

    require_loopback("http://127.0.0.1:28000")
    require_loopback("http://localhost:8000")
    for url in ("http://10.0.0.5:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            require_loopback(url)


def test_bench_cache_questions_are_deterministic_and_mixed() -> None:
    from ragtide.bench.cache import TOPICS, questions

    qs = questions()
    assert qs == questions() and len(qs) == len(TOPICS) * 9
    kinds = [k for k, _, _ in qs]
    assert kinds[: len(TOPICS)] == ["first"] * len(TOPICS)  # every topic is asked once before any repeat
    assert {"repeat", "paraphrase", "new"} <= set(kinds[len(TOPICS) :])
    assert len({q for kind, _, q in qs if kind == "first"}) == len(TOPICS)


def test_bench_freshness_refuses_an_unknown_precision_and_find_max_with_precisions(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ragtide.cli import app

    env = {"RAGTIDE_DATA_DIR": str(tmp_path)}
    bad = CliRunner().invoke(app, ["bench", "freshness", "--dtype", "fp64"], env=env)
    assert bad.exit_code == 2 and "one of fp32, fp16, bf16, int8" in bad.output
    both = CliRunner().invoke(app, ["bench", "freshness", "--dtype", "int8", "--find-max"], env=env)
    assert both.exit_code == 2 and "--find-max" in both.output


def test_bench_write_corpus_is_deterministic_with_long_rows_every_seventh() -> None:
    from ragtide.bench.write import corpus

    rows = corpus(50)
    assert rows == corpus(50) and rows != corpus(50, seed=8)
    words = [len(r["body"].split()) for r in rows]
    assert all(210 <= w <= 560 for w in words[::7]) and all(30 <= w <= 80 for i, w in enumerate(words) if i % 7)


def test_bench_freshness_dtype_needs_the_engine_backend(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ragtide.cli import app

    env = {"RAGTIDE_DATA_DIR": str(tmp_path), "RAGTIDE_ENCODER__BACKEND": "random-unit"}
    out = CliRunner().invoke(app, ["bench", "freshness", "--dtype", "int8"], env=env)
    assert out.exit_code == 2 and "encoder.backend: engine" in out.output


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (infra/scripts/system-deps.sh)")
def test_bench_serve_sends_no_query_text_twice_across_levels() -> None:
    """Every search of a run has its own text, across levels too: a text sent again (the next level restarting the
    counter) is answered from the query-vector cache without the model, which flattered every level after the
    first. Real wrk against a loopback server that records the bodies."""
    from ragtide.bench.load import run_level

    bodies: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{server.server_address[1]}"
        levels = [run_level(api, 2, 1) for _ in range(2)]
    finally:
        server.shutdown()
        server.server_close()
    assert all(lv.ok > 0 for lv in levels) and len(bodies) >= sum(lv.ok for lv in levels)
    texts = [json.loads(b)["query"] for b in bodies]
    assert len(set(texts)) == len(texts)


def test_bench_serve_measures_contenders_in_turns_on_fresh_nodes_and_keeps_each_ones_best_round() -> None:
    """this, baseline, this, baseline: each measured on a node started just before it, so neither contender gets
    all of the machine's quieter minutes; each keeps its best round, with every round's figure beside it."""
    from ragtide.bench.load import alternate

    calls: list[str] = []
    figures = iter([40.0, 20.0, 55.0, 18.0])  # this, baseline, this, baseline

    def node(name: str) -> tuple[str, Callable[[], None]]:
        return name, lambda: calls.append(f"start {name}")

    def measure() -> dict[str, Any]:
        calls.append("measure")
        return {"best_qps_p99_200ms": next(figures), "levels": [len(calls)]}

    got = alternate(2, [node("this"), node("baseline x")], measure, lambda _: None)
    assert calls == ["start this", "measure", "start baseline x", "measure"] * 2
    assert got["this"] == {"best_qps_p99_200ms": 55.0, "levels": [6], "round": 2, "rounds_best_qps": [40.0, 55.0]}
    assert got["baseline x"]["round"] == 1 and got["baseline x"]["rounds_best_qps"] == [20.0, 18.0]


def test_bench_serve_no_load_runs_no_wrk_and_one_round_keeps_the_running_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's options reach the plan by name (a field added to the plan once shifted --no-load into the rounds),
    and one round of this code alone restarts nothing: it measures the node as it runs."""
    from typer.testing import CliRunner

    from ragtide.bench import load, serve
    from ragtide.cli import app

    plans: list[serve.ServePlan] = []

    def capture(settings: Any, api: str, plan: serve.ServePlan, status: Any = None) -> Any:
        plans.append(plan)
        raise RuntimeError("captured")

    monkeypatch.setattr(serve, "run", capture)
    env = {"RAGTIDE_DATA_DIR": str(tmp_path)}
    CliRunner().invoke(app, ["bench", "serve", "--no-load", "--level-s", "7"], env=env)
    CliRunner().invoke(app, ["bench", "serve", "--baseline", "HEAD"], env=env)
    assert [(p.load, p.rounds, p.level_s, p.baseline) for p in plans] == [
        (False, 1, 7.0, None),
        (True, 2, 15.0, "HEAD"),
    ]
    from ragtide.stack import stack

    def no_stack(settings: Any) -> None:
        raise AssertionError("one round of this code alone must not touch the stack")

    monkeypatch.setattr(stack, "Stack", no_stack)
    with load.contenders(serve.RagtideSettings(), None, tmp_path, rounds=1) as nodes:
        assert [name for name, _ in nodes] == ["this"]
        nodes[0][1]()  # starts nothing


def test_bench_serve_stops_the_baseline_node_before_removing_its_worktree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The baseline's node imports from its worktree until it stops: stop, then remove the worktree, then start
    this checkout's node again."""
    import subprocess
    import tempfile

    from ragtide.bench import load
    from ragtide.contracts.settings import RagtideSettings
    from ragtide.stack import stack

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "src").mkdir()
    (repo / "src" / "x.py").write_text("")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    events: list[tuple[str, bool]] = []  # (what, whether a baseline worktree exists then)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the worktree goes

    def trees() -> bool:
        return any(scratch.glob("ragtide-baseline-*/src/x.py"))

    class Daemon:
        def stop(self, timeout: float) -> None:
            events.append(("stop", trees()))

    class FakeStack:
        def __init__(self, settings: Any) -> None:
            pass

        def daemon(self, name: str) -> Daemon:
            return Daemon()

        def start_node(self, code: Path | None = None) -> None:
            events.append((f"start {'baseline' if code else 'this'}", trees()))

        def wait_ready(self) -> None:
            pass

    monkeypatch.setattr(stack, "Stack", FakeStack)
    with load.contenders(RagtideSettings(), "HEAD", repo) as nodes:
        assert nodes[0][0] == "this" and nodes[1][0].startswith("baseline ")
        nodes[1][1]()
    assert events == [("stop", True), ("start baseline", True), ("stop", True), ("stop", False), ("start this", False)]
