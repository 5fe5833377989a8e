"""Versioned JSON artifacts, written atomically and read strictly.

Every artifact is ``{"type": ..., "version": ..., "data": {...}}``. Reading checks the type
and version, so a stale or foreign file is refused with a message naming what differs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from .errors import UserError


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temp file in the same directory and a rename.

    Either the whole new file is there or the old one is untouched; a failed write (a full
    disk, a path under a regular file, no permission) leaves no temp file and is a
    :class:`UserError` naming the path.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}; free some space, fix the permissions "
                            f"or choose another path") from None
        raise


def check_output(path: str | os.PathLike, flag: str, *, directory: bool = False) -> None:
    """Refuse, before any work is done, an output path that cannot be written.

    ``path`` (given with ``flag``) may not exist yet; its nearest existing ancestor must be a
    writable directory, and ``path`` itself, when it exists, a directory if ``directory`` and a
    file otherwise.
    """
    target = Path(path).absolute()
    if target.exists():
        if target.is_dir() != directory:
            raise UserError(f"{flag} {path}: is a {'directory' if target.is_dir() else 'file'}, expected a "
                            f"{'directory' if directory else 'file'}; choose another {flag}")
        parent = target if directory else target.parent
    else:
        parent = next(p for p in target.parents if p.exists())
        if not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable; choose another {flag}")


def write_artifact(path: str | os.PathLike, kind: str, version: int, data: dict[str, Any]) -> Path:
    """Write a versioned artifact ``{"type", "version", "data"}`` atomically; returns the path."""
    payload = json.dumps({"type": kind, "version": version, "data": data}, indent=2, sort_keys=False)
    atomic_write_bytes(path, (payload + "\n").encode())
    return Path(path)


# What rewrites each kind of artifact, for the messages that refuse one.
_REMEDY = {"profile": "re-run `autocompress profile --force`", "schedule": "re-run `autocompress search`",
           "search": "re-run `autocompress search`", "staged": "pass --restart to start the staged run over",
           "eval": "re-run `autocompress eval`", "compressed-model": "re-run `autocompress apply`",
           "sensitivity-predictor": "train the predictor again",
           "profile-partial": "re-run that shard with `autocompress profile --shard K/N --force`"}


def read_artifact(path: str | os.PathLike, kind: str, version: int) -> dict[str, Any]:
    """Read an artifact written by :func:`write_artifact`, refusing other types or versions.

    Every refusal is a :class:`UserError` naming the file, what is wrong and what rewrites it.
    """
    path = Path(path)
    remedy = _REMEDY.get(kind, "write it again")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (expected a {kind} artifact); give its path, or {remedy}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {kind} artifact") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); expected a {kind} artifact: {remedy}") from None
    if not isinstance(raw, dict) or set(raw) != {"type", "version", "data"}:
        raise UserError(f"{path}: expected keys type, version, data of a {kind} artifact; {remedy}")
    if raw["type"] != kind:
        raise UserError(f"{path}: is a {raw['type']!r} artifact, expected {kind!r}; give the {kind} file")
    if raw["version"] != version:
        raise UserError(f"{path}: {kind} version {raw['version']!r} is not supported (this autocompress reads "
                        f"{version}); {remedy} or use the autocompress that wrote it")
    if not isinstance(raw["data"], dict):
        raise UserError(f"{path}: field 'data' must be an object; {remedy}")
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


def type_error(value: Any, hint: Any, where: str) -> str | None:
    """Where ``value`` (parsed JSON) departs from the type ``hint``: ``"where: expected ..., got ..."``,
    or None when it fits.

    Understands the annotations of the artifacts' dataclasses: str, int, float (an int is a
    number too), bool, None, Any, ``X | None``, ``list[T]``, ``dict[str, T]`` and nested
    dataclasses (objects whose fields are checked by their own hints, unknown keys refused).
    """
    if hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1:  # X | None: say what is wrong inside X
            return type_error(value, inner[0], where)
        if any(type_error(value, arg, where) is None for arg in inner):
            return None
        return f"{where}: expected {' or '.join(_describe(a) for a in args)}, got {value!r:.60}"
    if hint is type(None):
        return None if value is None else f"{where}: expected null, got {value!r:.60}"
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {value!r:.60}"
        hints = _hints(hint)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            return f"{where}: unknown field {unknown[0]!r}"
        for f in dataclasses.fields(hint):
            if f.name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    return f"{where}: field {f.name!r} is missing"
                continue
            if (error := type_error(value[f.name], hints[f.name], f"{where}.{f.name}")) is not None:
                return error
        return None
    if origin is list:
        if not isinstance(value, list):
            return f"{where}: expected a list, got {value!r:.60}"
        return next((e for i, item in enumerate(value) if (e := type_error(item, args[0], f"{where}[{i}]"))), None)
    if origin is dict:
        if not isinstance(value, dict):
            return f"{where}: expected an object, got {value!r:.60}"
        return next((e for key, item in value.items() if (e := type_error(item, args[1], f"{where}[{key!r}]"))),
                    None)
    ok = {str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(hint)
    if ok is None:
        raise TypeError(f"type_error cannot check {hint!r}")  # a new annotation: teach this function
    return None if ok(value) else f"{where}: expected {_describe(hint)}, got {value!r:.60}"


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    return {list: "a list", dict: "an object"}.get(origin, "an object")
