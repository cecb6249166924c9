"""What a result ran on, and what the engine may use: the CPU's model and the features that decide embedding speed."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Model name, logical CPUs, and which of FEATURES the CPU has."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "features": [f for f in FEATURES if f in flags]}


_QUIET_AT_EXIT = {"enabled": True}


def quiet_native_teardown() -> None:
    """Silence stderr once the interpreter's exit handlers have run, if triton was imported.

    transformers imports `torch._dynamo`, which imports triton even on a CPU-only machine, and triton's nanobind
    extension prints hundreds of `nanobind: leaked ...` lines as the interpreter tears its modules down, after
    everything a process meant to say. Call this early: exit handlers run last-registered first, so this one runs
    after those registered later (torch's, triton's, the application's), which keep their stderr. An uncaught
    exception's traceback is printed before any exit handler, so it is never hidden. The long-running processes
    keep their stderr to the end (`keep_stderr_at_exit`): it is their log."""
    import atexit
    import sys

    def silence() -> None:
        if not _QUIET_AT_EXIT["enabled"] or "triton" not in sys.modules:
            return
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    atexit.register(silence)


def keep_stderr_at_exit() -> None:
    """A long-running process: nothing of its stderr is silenced at exit (see `quiet_native_teardown`)."""
    _QUIET_AT_EXIT["enabled"] = False
