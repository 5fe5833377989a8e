"""Where ``bench/llamacpp.sh build`` keeps llama.cpp's tools, for the benches and tests that run them."""
from __future__ import annotations

import os
from pathlib import Path


def llamacpp_bin() -> Path:
    """The folder of ``llama-perplexity``, ``llama-quantize`` and ``llama-imatrix``:
    ``$AUTOCOMPRESS_LLAMACPP/bin``, else ``llamacpp/bin`` in autocompress's cache."""
    from ..models import cache_dir  # noqa: PLC0415

    root = os.environ.get("AUTOCOMPRESS_LLAMACPP")
    return (Path(root) if root else cache_dir() / "llamacpp") / "bin"


def llamacpp_tool(name: str) -> Path | None:
    """The path of ``llama-<name>`` when it has been built, else None."""
    path = llamacpp_bin() / f"llama-{name}"
    return path if path.is_file() and os.access(path, os.X_OK) else None
