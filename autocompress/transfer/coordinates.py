"""Model-agnostic coordinates: where a unit sits in *any* model, so a schedule can move between models.

A unit name such as ``model.layers.17.mlp.down_proj`` only means something for one model. Its
coordinates do not: the unit's **role** (``block`` for a whole decoder block, else the linear's
role ``q``/``k``/``v``/``o``/``gate``/``up``/``down``, fused ``qkv``/``gate_up``, or ``head``),
its **relative depth** (block index / (blocks - 1), so 0 is the first block and 1 the last) and
its **relative size** (its parameters over the mean of units of the same kind). :func:`describe`
stores them in ``schedule.meta["agnostic"]`` next to the source model's shape
(``meta["source_model"]``) and, when a profile is at hand, a normalised summary of the source's
measured sensitivity (``meta["source_profile"]``) that transfer uses to price choices on a model
it has never profiled.

Example::

    schedule = describe(schedule, model, profile)
    schedule.meta["agnostic"]["model.layers.3"]
    # {"role": "block", "relative_depth": 0.103, "relative_size": 1.0, "choice": {...}}
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..artifacts import type_error
from ..errors import UserError
from ..schedule import Choice, Schedule

BLOCK_ROLE = "block"
HEAD_ROLE = "head"


@dataclass(frozen=True)
class UnitCoordinates:
    """Where one unit of one model sits: block index, role, relative depth, relative size, parameters."""

    name: str
    block: int  # -1 for the output head
    role: str
    relative_depth: float
    relative_size: float
    parameters: int


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a model that transfer reports: family, blocks, width, parameters."""

    family: str
    blocks: int
    hidden: int
    parameters: int
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for ``schedule.meta["source_model"]``."""
        return dataclasses.asdict(self)


def relative_depth(index: int, blocks: int) -> float:
    """``index / (blocks - 1)``: 0 for the first block, 1 for the last (0 for a one-block model)."""
    return index / (blocks - 1) if blocks > 1 else 0.0


def model_coordinates(model) -> dict[str, UnitCoordinates]:
    """Coordinates of every block, every decoder linear and the output head of ``model``.

    Relative size is taken within a kind: a block against the mean block, a linear against the
    mean decoder linear (so a pruned MLP's ``down`` is smaller than 1), the head is 1.
    """
    from ..compress.memory import MemoryModel  # noqa: PLC0415

    memory = MemoryModel.from_model(model)
    count = len(memory.blocks)
    if count == 0:
        raise UserError("the model has no decoder blocks; transfer needs a decoder-only transformer")
    block_params = [memory.block_parameters(i, Choice()) for i in range(count)]
    linear_params = {(i, role): s.out * s.inp for i, b in enumerate(memory.blocks) for role, s in b.linears.items()}
    mean_block = sum(block_params) / count
    mean_linear = sum(linear_params.values()) / max(len(linear_params), 1)
    out = {}
    for i in range(count):
        name = f"{memory.blocks_path}.{i}"
        depth = relative_depth(i, count)
        out[name] = UnitCoordinates(name, i, BLOCK_ROLE, depth, block_params[i] / mean_block, block_params[i])
        for role, path in memory.paths.items():
            params = linear_params[(i, role)]
            out[f"{name}.{path}"] = UnitCoordinates(f"{name}.{path}", i, role, depth, params / mean_linear, params)
    head = memory.head.out * memory.head.inp
    out[memory.head_name] = UnitCoordinates(memory.head_name, -1, HEAD_ROLE, 1.0, 1.0, head)
    if memory.embedding_name:  # the token table: with a tied head it is the head's weight too
        out[memory.embedding_name] = UnitCoordinates(memory.embedding_name, -1, HEAD_ROLE, 1.0, 1.0, head)
    return out


def model_shape(model) -> ModelShape:
    """Family, block count, hidden width, parameter count and fingerprint of ``model``."""
    from ..compress.memory import MemoryModel  # noqa: PLC0415
    from ..models import adapter_for, model_fingerprint, parameter_count  # noqa: PLC0415

    memory = MemoryModel.from_model(model)
    return ModelShape(adapter_for(model).family, len(memory.blocks), memory.head.inp, parameter_count(model),
                      model_fingerprint(model))


def profile_summary(profile, coordinates: dict[str, UnitCoordinates] | None = None) -> dict[str, Any]:
    """The source profile reduced to what another model can use: per unit role, relative depth,
    relative size and KL at each probe label, divided by one scale (the median positive KL) so ratios between labels
    and units survive but the model's absolute numbers do not."""
    values = sorted(v for u in profile.units for v in u.kl.values() if v > 0 and math.isfinite(v))
    scale = values[len(values) // 2] if values else 1.0
    blocks = max((u.block for u in profile.units), default=0) + 1
    units = []
    for unit in profile.units:
        coords = (coordinates or {}).get(unit.name)
        role = coords.role if coords else unit.role
        depth = coords.relative_depth if coords else (unit.relative_depth or relative_depth(unit.block, blocks))
        units.append({"name": unit.name, "role": role, "relative_depth": round(depth, 6),
                      "relative_size": round(coords.relative_size, 6) if coords else 1.0,
                      "kl": {label: (v / scale if math.isfinite(v) else None) for label, v in unit.kl.items()}})
    return {"model_fingerprint": profile.model_fingerprint, "labels": profile.labels(),
            "choices": profile.choices, "scale": scale, "units": units}


@dataclass(frozen=True)
class _SourceModel:
    """``meta["source_model"]`` as read back (fields optional: only their types are checked)."""

    family: str | None = None
    blocks: int | None = None
    hidden: int | None = None
    parameters: int | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class _SummaryUnit:
    """One unit of ``meta["source_profile"]`` (see :func:`profile_summary`)."""

    role: str
    relative_depth: float
    kl: dict[str, float | None]
    name: str = ""
    relative_size: float = 1.0  # summaries written before sizes were stored have none


@dataclass(frozen=True)
class _Summary:
    """``meta["source_profile"]`` as read back."""

    units: list[_SummaryUnit]
    model_fingerprint: str = ""
    labels: list[str] = dataclasses.field(default_factory=list)
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)
    scale: float = 1.0


def check_source_meta(schedule: Schedule, where: str = "schedule") -> None:
    """Refuse (one-line :class:`UserError`) a schedule whose ``meta`` fields that transfer reads
    (``source_model``, ``source_profile``, ``agnostic``) hold the wrong types."""
    for key, hint in (("source_model", _SourceModel), ("source_profile", _Summary)):
        if key in schedule.meta and (error := type_error(schedule.meta[key], hint, f"meta.{key}")) is not None:
            raise UserError(f"{where}: {error}; re-run `autocompress search` or fix the file")
    agnostic_choices(schedule, where)


def describe(schedule: Schedule, model, profile=None, *, signature: list[float] | None = None) -> Schedule:
    """``schedule`` with model-agnostic coordinates in its meta (see the module docstring).

    ``meta["agnostic"]`` maps each unit to ``{role, relative_depth, relative_size, choice}``;
    ``meta["source_model"]`` holds the model's family, block count, width and parameters;
    ``meta["source_profile"]`` (only with ``profile``) the normalised per-unit KL summary;
    ``meta["source_signature"]`` the per-block influence that transfer aligns blocks by
    (:mod:`.alignment`): ``signature`` if given, else the profile's ``block_influence`` proxies.
    Units the schedule names but the model lacks are a :class:`UserError`.
    """
    from .alignment import signature_from_profile  # noqa: PLC0415

    coordinates = model_coordinates(model)
    agnostic = {}
    for name, choice in schedule.units.items():
        coords = coordinates.get(name)
        if coords is None:
            raise UserError(f"schedule names unit {name!r}, which this model does not have")
        agnostic[name] = {"role": coords.role, "relative_depth": round(coords.relative_depth, 6),
                          "relative_size": round(coords.relative_size, 6), "choice": choice.to_json()}
    meta = dict(schedule.meta)
    shape = model_shape(model).to_json()
    same_model = schedule.meta.get("source_model", {}).get("fingerprint") == shape["fingerprint"]
    meta["agnostic"] = agnostic
    meta["source_model"] = shape
    if profile is not None:
        meta["source_profile"] = profile_summary(profile, coordinates)
    if signature is None and profile is not None:
        signature = signature_from_profile(profile)
    blocks = meta["source_model"]["blocks"]
    if signature is not None and len(signature) == blocks:
        meta["source_signature"] = {"kind": "block_influence", "values": [round(float(v), 8) for v in signature]}
    elif not same_model:  # a signature measured on another model says nothing about this one
        meta.pop("source_signature", None)
    return dataclasses.replace(schedule, meta=meta)


@dataclass(frozen=True)
class AgnosticChoice:
    """One entry of ``meta["agnostic"]``, read back strictly."""

    name: str
    role: str
    relative_depth: float
    relative_size: float
    choice: Choice


def agnostic_choices(schedule: Schedule, where: str = "schedule") -> list[AgnosticChoice]:
    """The coordinates stored by :func:`describe`, or, for an older schedule without them, inferred
    from unit names alone (role from the path, depth from the block index; relative size 1)."""
    data = schedule.meta.get("agnostic")
    if data is None:
        return _inferred(schedule, where)
    if not isinstance(data, dict):
        raise UserError(f"{where}: meta.agnostic must be an object of unit -> coordinates")
    out = []
    for name, entry in data.items():
        at = f"{where}: meta.agnostic[{name!r}]"
        if not isinstance(entry, dict) or set(entry) != {"role", "relative_depth", "relative_size", "choice"}:
            raise UserError(f"{at}: expected exactly role, relative_depth, relative_size and choice")
        if not isinstance(entry["role"], str):
            raise UserError(f"{at}.role: expected a string")
        for key in ("relative_depth", "relative_size"):
            if isinstance(entry[key], bool) or not isinstance(entry[key], (int, float)):
                raise UserError(f"{at}.{key}: expected a number")
        out.append(AgnosticChoice(name, entry["role"], float(entry["relative_depth"]), float(entry["relative_size"]),
                                  Choice.from_json(entry["choice"], f"{at}.choice")))
    if not out:
        raise UserError(f"{where}: the schedule has no units to transfer")
    return out


def _inferred(schedule: Schedule, where: str) -> list[AgnosticChoice]:
    from ..models import ADAPTERS  # noqa: PLC0415

    roles = {path: role for adapter in ADAPTERS for role, path in adapter.linears.items()}
    prefixes = sorted({a.blocks_path for a in ADAPTERS}, key=len, reverse=True)
    parsed = []
    for name, choice in schedule.units.items():
        prefix = next((p for p in prefixes if name.startswith(p + ".")), None)
        if prefix is None:
            if name == "lm_head" or name in {a.embeddings[0] for a in ADAPTERS}:
                parsed.append((name, -1, HEAD_ROLE, choice))
                continue
            raise UserError(f"{where}: cannot place unit {name!r} in another model (not a block, linear or head)")
        index_text, _, path = name[len(prefix) + 1:].partition(".")
        if not index_text.isdigit() or (path and path not in roles):
            raise UserError(f"{where}: cannot place unit {name!r} in another model (unknown layout)")
        parsed.append((name, int(index_text), roles[path] if path else BLOCK_ROLE, choice))
    blocks = max((b for _, b, _, _ in parsed), default=0) + 1
    if not parsed:
        raise UserError(f"{where}: the schedule has no units to transfer")
    return [AgnosticChoice(name, role, 1.0 if block < 0 else relative_depth(block, blocks), 1.0, choice)
            for name, block, role, choice in parsed]


__all__ = ["UnitCoordinates", "ModelShape", "AgnosticChoice", "model_coordinates", "model_shape",
           "profile_summary", "describe", "agnostic_choices", "relative_depth", "BLOCK_ROLE", "HEAD_ROLE"]
