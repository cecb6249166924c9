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
