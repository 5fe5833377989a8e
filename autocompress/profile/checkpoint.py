"""Finished units of a profile in progress, kept on disk so a killed ``profile`` resumes.

Every measured unit is written at once to ``RUN/profile.units/<unit>.json`` (a temp file in
the same folder, then a rename), stamped with a key: the fingerprint of everything that
decides its numbers (model, measured tokens, search space, profile settings, the run's
calibration rows, this autocompress's version). A rerun loads the files whose key matches
and measures only the rest; a file with another key (another space, other data...) or a
damaged one (a truncated write) is deleted and its unit measured again, so units of two
different runs are never mixed. Once ``profile.json`` is written the folder goes.

A unit's numbers depend only on the original model's activations and its own compressed
copy, never on the units measured before it, so a reused unit equals a remeasured one; and
JSON keeps a float's exact value, so the resumed profile is the uninterrupted one.

Example::

    checkpoints = UnitCheckpoints(Path("runs/x") / CHECKPOINT_DIR, key)
    finished = checkpoints.load()          # unit name -> UnitProfile
    checkpoints.save([unit])               # after measuring it
    checkpoints.clear()                    # once profile.json is in place
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts import fingerprint, read_artifact, type_error, write_artifact
from ..errors import UserError
from .artifact import UnitProfile

CHECKPOINT_DIR = "profile.units"
UNIT_TYPE = "profile-unit"
UNIT_VERSION = 1
EXTRA = "extra-units"  # the file of the units outside the decoder blocks (embedding, head)


def checkpoint_key(model_fp: str, data_fp: str, space_fp: str, settings: Any, calibration_fp: str | None) -> str:
    """Fingerprint of everything a unit's measurement depends on (``settings``: a ProfileSettings;
    its ``progress`` flag changes nothing measured and is left out)."""
    chosen = {k: v for k, v in asdict(settings).items() if k != "progress"}
    return fingerprint(model_fp, data_fp, space_fp, chosen, calibration_fp, __version__)


@dataclass(frozen=True)
class UnitCheckpoints:
    """The finished units under ``folder``, valid for ``key`` only."""

    folder: Path
    key: str

    def path(self, name: str) -> Path:
        """The file of unit ``name`` (or of :data:`EXTRA`)."""
        return self.folder / f"{name}.json"

    def load(self) -> dict[str, list[UnitProfile]]:
        """File name (a unit's name, or :data:`EXTRA`) -> its finished units.

        Files of another key, damaged files and temp files a killed write left behind are
        deleted: their units are measured again.
        """
        finished: dict[str, list[UnitProfile]] = {}
        if not self.folder.is_dir():
            return finished
        for path in sorted(self.folder.iterdir()):
            units = self._read(path) if path.is_file() and path.suffix == ".json" else None
            if units is None:
                _remove(path)
            else:
                finished[path.stem] = units
        return finished

    def _read(self, path: Path) -> list[UnitProfile] | None:
        try:
            data = read_artifact(path, UNIT_TYPE, UNIT_VERSION)
        except UserError:
            return None
        if data.get("key") != self.key or set(data) != {"key", "units"} or not isinstance(data["units"], list):
            return None
        if any(type_error(u, UnitProfile, "unit") is not None for u in data["units"]):
            return None
        return [UnitProfile(**u) for u in data["units"]]

    def save(self, name: str, units: list[UnitProfile]) -> None:
        """Write the finished ``units`` under ``name`` atomically."""
        write_artifact(self.path(name), UNIT_TYPE, UNIT_VERSION,
                       {"key": self.key, "units": [asdict(u) for u in units]})

    def clear(self) -> None:
        """Remove the folder and everything in it."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
