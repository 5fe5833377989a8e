"""Versioned JSON artifacts, written atomically and read strictly.

Every artifact is ``{"type": ..., "version": ..., "data": {...}}``. Reading checks the type
and version, so a stale or foreign file is refused with a message naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_artifact(path: str | os.PathLike, kind: str, version: int, data: dict[str, Any]) -> Path:
    """Write a versioned artifact ``{"type", "version", "data"}`` atomically; returns the path."""
    payload = json.dumps({"type": kind, "version": version, "data": data}, indent=2, sort_keys=False)
    atomic_write_bytes(path, (payload + "\n").encode())
    return Path(path)


def read_artifact(path: str | os.PathLike, kind: str, version: int) -> dict[str, Any]:
    """Read an artifact written by :func:`write_artifact`, refusing other types or versions."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (expected a {kind} artifact)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); expected a {kind} artifact") from None
    if not isinstance(raw, dict) or set(raw) != {"type", "version", "data"}:
        raise UserError(f"{path}: expected keys type, version, data of a {kind} artifact")
    if raw["type"] != kind:
        raise UserError(f"{path}: is a {raw['type']!r} artifact, expected {kind!r}")
    if raw["version"] != version:
        raise UserError(f"{path}: {kind} version {raw['version']} is not supported (this autocompress reads {version})")
    if not isinstance(raw["data"], dict):
        raise UserError(f"{path}: field 'data' must be an object")
    return raw["data"]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (for configs, options, token ids...)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]
