"""The one place that imports Triton: read-only facts about what this process can run.

Everything here is decided once, at import, and never changed afterwards:

* ``TRITON_AVAILABLE``: ``import triton`` succeeded (``TRITON_IMPORT_ERROR`` says why not).
* ``INTERPRET``: ``TRITON_INTERPRET=1`` was set before Triton was imported. Triton reads the
  variable when a kernel is decorated, so setting it later has no effect; that is also why
  the interpreter tests run in a fresh subprocess.
* ``CUDA_AVAILABLE``: torch sees a CUDA device.

Other modules read these flags; nothing assigns to them (no global backend switch).
"""
from __future__ import annotations

import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA_AVAILABLE: bool = torch.cuda.is_available()

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as error:  # Triton is Linux-only; elsewhere the PyTorch reference runs.
    TRITON_AVAILABLE: bool = False
    TRITON_IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    TRITON_AVAILABLE = True
    TRITON_IMPORT_ERROR = None


def triton_runnable() -> bool:
    """Whether Triton kernels can run here at all (a GPU, or the interpreter on CPU)."""
    return TRITON_AVAILABLE and (CUDA_AVAILABLE or INTERPRET)
