"""The append-only event log of a rollout: one JSON object per line in ``RUN/events.jsonl``.

Every line carries ``v`` (the schema version), ``t`` (Unix time) and ``type``. Each event is
written with one ``write`` and flushed, so a ``kill -9`` loses at most the line being
written; opening the log again drops such a torn last line before appending.

Types and their fields:

* ``start``: ``original``, ``candidate``, ``policy``, ``shadow``, ``seed``, ``share``, ``resumed``
* ``request`` (``t`` is when it ended): ``arm``, ``started`` (Unix time it was sent to the arm),
  ``latency`` and ``ttft`` (seconds), ``tokens``, ``error``, ``aborted``
  (cut off by a failover), ``retried`` (served by the original after the candidate failed),
  ``stream``, ``pinned``
* ``shadow``: ``kl``, ``agreement``, ``logprob`` (per-token means), ``tokens``
* ``shadow_dropped``: a sampled request left unscored because the scoring queue was full
* ``promote``: ``stage``, ``share``, ``by``, ``reason``; ``failover``: ``stage``, ``reason``;
  ``rollback``: ``reason``; ``pause``: ``paused``
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UserError

VERSION = 1
TYPES = ("start", "request", "shadow", "shadow_dropped", "promote", "failover", "rollback", "pause")
FILENAME = "events.jsonl"


def read_events(path: str | Path) -> list[dict]:
    """Every complete event in the log at ``path``, checked; a torn last line is left out."""
    events = []
    for number, line in enumerate(_complete_lines(path), 1):
        events.append(_parse(path, number, line))
    return events


def scan_events(path: str | Path) -> tuple[list[dict], list[str]]:
    """Like :func:`read_events`, but a damaged line is skipped and named in the second list, not raised.

    For readers that show a log (the report) rather than resume from it: one bad line must
    not hide the rest.
    """
    events, problems = [], []
    for number, line in enumerate(_complete_lines(path), 1):
        try:
            events.append(_parse(path, number, line))
        except UserError as exc:
            problems.append(str(exc))
    return events, problems


def _complete_lines(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the event log {path}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        lines.pop()  # no newline at the end: the process died while writing it
    return lines


def _parse(path: str | Path, number: int, line: str) -> dict:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{path} line {number} is not JSON; the event log is damaged") from None
    if not isinstance(event, dict) or event.get("v") != VERSION or event.get("type") not in TYPES:
        raise UserError(f"{path} line {number}: not an autocompress serve event of version {VERSION} "
                        f"(type must be one of {', '.join(TYPES)})")
    return event


class EventLog:
    """Appends events to ``RUN/events.jsonl`` (created if missing); :attr:`past` holds those it found there."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.past = read_events(self.path) if self.path.exists() else []
        self._drop_torn_line()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the server's life)

    def _drop_torn_line(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)

    def append(self, event: dict, now: float | None = None) -> dict:
        """Stamp ``event`` with the version and time, write it as one line, flush; returns it."""
        if event.get("type") not in TYPES:
            raise ValueError(f"unknown event type {event.get('type')!r}")
        stamped = {"v": VERSION, "t": round(time.time() if now is None else now, 4), **event}
        self._file.write(json.dumps(stamped, separators=(",", ":")) + "\n")
        self._file.flush()
        return stamped

    def sync(self) -> None:
        """Force what was written onto the disk (flushes already survive a killed process)."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()
