"""Start, watch and stop daemons by pid file; wait for ports and HTTP endpoints with deadlines."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import default_ports


@dataclass(frozen=True)
class Daemon:
    """A process of the stack, known by name, with its pid file and log under the data folder."""

    name: str
    run_dir: Path
    log_dir: Path
    stop_signal: signal.Signals = signal.SIGTERM

    @property
    def pid_file(self) -> Path:
        """Where the pid is kept."""
        return self.run_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        """Where stdout and stderr go."""
        return self.log_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid, if the process is alive."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Start the process detached (own session), unless it is already running."""
        if (pid := self.pid()) is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL. True if a process was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        stop_pid(pid, timeout, self.stop_signal)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 40) -> str:
        """The end of the log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def stop_pid(pid: int, timeout: float, first: signal.Signals = signal.SIGTERM) -> None:
    """Terminate a process group politely, then forcefully."""
    for sig, wait in ((first, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def wait_until(check: Callable[[], bool], what: str, timeout: float, daemon: Daemon | None = None) -> None:
    """Poll `check` until it is true; fail with the daemon's log tail when the deadline passes or it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        if daemon is not None and daemon.pid() is None:
            raise StackError(f"{daemon.name} exited while waiting for {what}; log {daemon.log_file}:\n{daemon.tail()}")
        time.sleep(0.25)
    tail = f"; log {daemon.log_file}:\n{daemon.tail()}" if daemon else ""
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def port_open(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    """True if GET url answers 2xx."""
    return httpx.get(url, timeout=2.0).is_success


# Ports handed out by this process (free_port, free_port_range): none is handed out twice, even before it is bound;
# and none of the defaults of `ragtide up` and `up --cluster` (a stopped dev stack, or one being restarted, keeps them).
_HANDED_OUT: set[int] = set(default_ports().values())


def free_port(low: int = 20_000, high: int = 32_000) -> int:
    """A TCP port free right now on loopback, below Linux's ephemeral range (32768-60999): a port from that range
    can be taken by a client's outgoing connection between this call and the server's bind (seen in CI: a node's
    API port held by a connection to its own Kafka). Never the same port twice in one process."""
    import random

    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise StackError(f"no free port between {low} and {high}")


def free_port_range(span: int, low: int = 20_000, high: int = 32_000) -> int:
    """The first of `span` consecutive ports nothing listens on, below Linux's ephemeral range (32768-60999),
    where a client's outgoing connection could hold one of them when a server later binds it."""
    import random

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high - span)
        ports = range(base, base + span)
        if _HANDED_OUT.intersection(ports) or any(port_open("127.0.0.1", p) for p in ports):
            continue
        _HANDED_OUT.update(ports)
        return base
    raise StackError(f"no {span} free ports in a row between {low} and {high}")


def run_checked(argv: Sequence[str], what: str) -> str:
    """Run a short command to completion; its stdout, or a StackError that says `what` failed and shows why."""
    out = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise StackError(f"{what} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout
