"""The run's calibration rows: chosen once by ``profile``, read by ``search`` and ``apply``.

GPTQ Hessians and Wanda norms come from these rows, so the codes a trial measures are the
codes ``apply`` ships: the same rows, the same original-model activations, the same choice
give the same weights. The rows live in ``RUN/calibration.safetensors`` (token ids, no
pickle) with their selection mode, the span of the split they were drawn from (the search's
held-aside text starts after it) and a fingerprint that later stages check.

Example::

    save_calibration("runs/x", rows, mode="curated", span=16384)
    rows = load_calibration("runs/x").rows      # LongTensor [n, seq_len]
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .errors import UserError

CALIBRATION_FILE = "calibration.safetensors"


def rows_fingerprint(rows: torch.Tensor) -> str:
    """A short hash of the token ids and their shape."""
    digest = hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(str(tuple(rows.shape)).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration rows [n, seq_len], how they were chosen, and how many split tokens they span."""

    rows: torch.Tensor
    mode: str
    span: int

    @property
    def fingerprint(self) -> str:
        """:func:`rows_fingerprint` of the rows."""
        return rows_fingerprint(self.rows)

    def describe(self) -> dict:
        """Plain-dict summary for artifacts (no token ids)."""
        return {"mode": self.mode, "rows": int(self.rows.shape[0]), "seq_len": int(self.rows.shape[1]),
                "span": self.span, "fingerprint": self.fingerprint}


def save_calibration(run_dir: str | os.PathLike, calibration: CalibrationSet) -> Path:
    """Write ``RUN/calibration.safetensors`` atomically (temp file, then rename)."""
    path = Path(run_dir) / CALIBRATION_FILE
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        safetensors.torch.save_file({"rows": calibration.rows.to(torch.int64).contiguous()}, tmp,
                                    metadata={"mode": calibration.mode, "span": str(calibration.span)})
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; free some space or choose another "
                        f"--out") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_calibration(run_dir: str | os.PathLike, expected: str | None = None) -> CalibrationSet | None:
    """The run's calibration rows, or None when the run has none (a profile from before they existed).

    ``expected`` is the fingerprint the profile recorded; other rows are refused.
    """
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            rows = handle.get_tensor("rows")
        span = int(metadata.get("span", rows.numel()))
    except (safetensors.SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path}: unreadable calibration rows ({str(exc).splitlines()[0]}); "
                        f"re-run `autocompress profile --force`") from None
    if rows.dim() != 2 or rows.dtype != torch.int64:
        raise UserError(f"{path}: expected int64 token rows [n, seq_len], got {rows.dtype} {tuple(rows.shape)}")
    calibration = CalibrationSet(rows, metadata.get("mode", "first"), span)
    if expected is not None and calibration.fingerprint != expected:
        raise UserError(f"{path} holds other calibration rows than profile.json recorded "
                        f"({calibration.fingerprint} vs {expected}); re-run `autocompress profile --force`")
    return calibration
