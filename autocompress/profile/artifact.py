"""``profile.json``: what the profiler measured, in the form every later stage reads.

One :class:`UnitProfile` per searchable unit (a decoder block, or a linear layer with
``--granularity linear``) holds, per probe choice of the search space (labels from
:meth:`~autocompress.search.space.SearchSpace.probe_choices`: ``bits=3``, ``2:4``,
``heads=0.25``, ``drop``...), the KL of the model's next-token distribution from the
original's and the change in loss with only that unit changed; plus the cheap proxies and the
linguistic role of the block. The profile carries the fingerprints of the model, the data
and the space it was made from, so a stale profile is refused, never silently reused.
A :class:`PartialProfile` (``profile.partial.json``) is one shard's share of a profile,
merged with the others into ``profile.json`` by :mod:`autocompress.profile.shard`.

Example::

    profile = Profile.load("runs/x/profile.json")
    profile.check_matches(model_fp, data_fp, space_fp)
    profile.unit("model.layers.29").kl["bits=2"]
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import fingerprint, read_artifact, type_error, write_artifact
from ..errors import UserError

PROFILE_TYPE = "profile"
PROFILE_VERSION = 1
PARTIAL_TYPE = "profile-partial"
PARTIAL_VERSION = 1
PARTIAL_FILE = "profile.partial.json"
FINGERPRINTS = ("model", "data", "space", "settings", "calibration")


@dataclass
class UnitProfile:
    """Measurements of one unit.

    ``kl`` and ``loss_delta`` map a probe-choice label to the mean KL(original || changed)
    per token and to loss(changed) - loss(original), on calibration tokens. ``proxies`` maps a
    proxy name (``fisher``, ``block_influence``, ``weight_kurtosis``, ``weight_max_ratio``,
    ``activation_norm``...) to its value. ``roles`` maps a probe task (``lexical``,
    ``morphology``, ``word_class``, ``nesting``, ``prediction``) to its selectivity on this
    block's output hidden states; ``dominant_role`` is the task with the highest selectivity.
    ``role`` is the linear's role (q, k, v, o, gate, up, down...) or ``block``.
    """

    name: str
    block: int
    role: str = "block"
    relative_depth: float = 0.0
    parameters: int = 0
    kl: dict[str, float] = field(default_factory=dict)
    loss_delta: dict[str, float] = field(default_factory=dict)
    proxies: dict[str, float] = field(default_factory=dict)
    roles: dict[str, float] = field(default_factory=dict)
    dominant_role: str | None = None


@dataclass
class AdditivityCheck:
    """For one bit width: KL of every unit at ``bits`` predicted as the sum of single-unit KLs, and measured."""

    bits: int
    predicted_kl: float
    measured_kl: float
    predicted_loss_delta: float = 0.0
    measured_loss_delta: float = 0.0


@dataclass
class Profile:
    """The whole profile of one model on one data set under one search space."""

    model: str
    model_fingerprint: str
    data: str
    data_fingerprint: str
    space: str
    space_fingerprint: str
    granularity: str
    calibration_tokens: int
    base_loss: float
    choices: dict[str, dict[str, Any]]  # probe label -> Choice.to_json()
    units: list[UnitProfile]
    additivity: list[AdditivityCheck] = field(default_factory=list)
    proxy_spearman: dict[str, float] = field(default_factory=dict)  # proxy -> Spearman rho with measured KL
    role_curves: dict[str, list[float]] = field(default_factory=dict)  # task -> selectivity per layer (0 = embeddings)
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    # Units outside the decoder blocks (the token embedding with a tied head, an untied head):
    # block index -1, role "embedding" or "head", measured by a full forward pass per choice.
    extra_units: list[UnitProfile] = field(default_factory=list)

    def unit(self, name: str) -> UnitProfile:
        """The profile of unit ``name`` (KeyError naming the known units' pattern if absent)."""
        for unit in self.units + self.extra_units:
            if unit.name == name:
                return unit
        raise KeyError(f"unit {name!r} is not in this profile (first unit: {self.units[0].name if self.units else '-'})")

    def labels(self) -> list[str]:
        """The decoder units' probe-choice labels, in the order measured (``embed:`` labels left out)."""
        return [label for label in self.choices if not label.startswith("embed:")]

    def check_matches(self, model_fingerprint: str | None = None, data_fingerprint: str | None = None,
                      space_fingerprint: str | None = None, *, path: str | os.PathLike = "profile.json") -> None:
        """Refuse (UserError naming the difference) a profile made from another model, data or space."""
        for what, mine, theirs in (("model", self.model_fingerprint, model_fingerprint),
                                   ("data", self.data_fingerprint, data_fingerprint),
                                   ("search space", self.space_fingerprint, space_fingerprint)):
            if theirs is not None and mine != theirs:
                raise UserError(f"{path} was made for another {what} (fingerprint {mine}, now {theirs}); "
                                f"re-run `autocompress profile` or point at a matching run directory")

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike = "profile.json") -> Profile:
        """Strict inverse of :meth:`to_json`: a missing field, an unknown one or a wrong type names it."""
        if (error := type_error(data, cls, "profile")) is not None:
            raise UserError(f"{path}: not a valid profile ({error}); re-run `autocompress profile --force`")
        calibration = data["meta"].get("calibration", {}) if "meta" in data else {}
        if not isinstance(calibration, dict) or not isinstance(calibration.get("fingerprint", ""), str):
            raise UserError(f"{path}: not a valid profile (profile.meta.calibration: expected an object with a "
                            f"string fingerprint, got {calibration!r:.60}); re-run `autocompress profile --force`")
        try:
            units = [UnitProfile(**u) for u in data["units"]]
            extra = [UnitProfile(**u) for u in data.get("extra_units", [])]
            additivity = [AdditivityCheck(**a) for a in data.get("additivity", [])]
            rest = {k: v for k, v in data.items() if k not in ("units", "additivity", "extra_units")}
            return cls(units=units, additivity=additivity, extra_units=extra, **rest)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a valid profile ({exc}); re-run `autocompress profile`") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``profile.json`` atomically."""
        return write_artifact(path, PROFILE_TYPE, PROFILE_VERSION, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        """Read a profile written by :meth:`save`."""
        return cls.from_json(read_artifact(path, PROFILE_TYPE, PROFILE_VERSION), path)


@dataclass
class PartialProfile:
    """One shard's share of a profile (``RUN_K/profile.partial.json``, see :mod:`.shard`).

    Shard ``shard`` of ``shards`` measured the units ``measured`` (its ``profile.units``, in
    order) out of ``unit_names``, every unit the space leaves unfrozen in the model. Shard 0
    also holds what is measured once for the whole model (the embedding units, the roles).
    ``fingerprints`` names what every shard of one profile must share: ``model``, ``data``
    (the measured tokens), ``space``, ``settings`` (of ``settings``, the ProfileSettings as a
    dict) and ``calibration`` (the run's calibration rows).
    """

    shard: int
    shards: int
    fingerprints: dict[str, str]
    settings: dict[str, Any]
    unit_names: list[str]
    measured: list[str]
    profile: Profile

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {"shard": self.shard, "shards": self.shards, "fingerprints": dict(self.fingerprints),
                "settings": dict(self.settings), "unit_names": list(self.unit_names), "measured": list(self.measured),
                "profile": self.profile.to_json()}

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike = PARTIAL_FILE) -> PartialProfile:
        """Strict inverse of :meth:`to_json`; a partial whose parts disagree with each other is refused too."""
        remedy = "re-run `autocompress profile MODEL --shard K/N --force` for that shard"
        if (error := type_error(data, cls, "partial")) is not None:
            raise UserError(f"{path}: not a valid partial profile ({error}); {remedy}")
        profile = Profile.from_json(data["profile"], path)
        part = cls(**{**data, "profile": profile})
        if (problem := part._inconsistency()) is not None:
            raise UserError(f"{path}: not a valid partial profile ({problem}); {remedy}")
        return part

    def _inconsistency(self) -> str | None:
        if not 0 <= self.shard < self.shards:
            return f"shard {self.shard}/{self.shards} is out of range"
        if sorted(self.fingerprints) != sorted(FINGERPRINTS):
            return f"fingerprints must be exactly {', '.join(FINGERPRINTS)}"
        if self.fingerprints["settings"] != fingerprint(self.settings):
            return "the settings fingerprint does not match the settings"
        for what, recorded in (("model", self.profile.model_fingerprint), ("data", self.profile.data_fingerprint),
                               ("space", self.profile.space_fingerprint),
                               ("calibration", self.profile.meta.get("calibration", {}).get("fingerprint"))):
            if self.fingerprints[what] != recorded:
                return f"the {what} fingerprint {self.fingerprints[what]} differs from its profile's {recorded}"
        if self.measured != [u.name for u in self.profile.units]:
            return "measured differs from the profile's units"
        if not set(self.measured) <= set(self.unit_names):
            return "measured names units outside unit_names"
        return None

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``profile.partial.json`` atomically."""
        return write_artifact(path, PARTIAL_TYPE, PARTIAL_VERSION, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PartialProfile:
        """Read a partial profile written by :meth:`save`."""
        return cls.from_json(read_artifact(path, PARTIAL_TYPE, PARTIAL_VERSION), path)
