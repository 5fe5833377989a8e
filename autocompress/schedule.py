"""The Schedule: which compression each unit of a model gets, and its strict JSON form.

A schedule maps *unit names* to :class:`Choice` values. A unit is either a decoder block
(``model.layers.3``, that is ``f"{adapter.blocks_path}.{i}"``), a linear layer inside a
block (``model.layers.3.self_attn.q_proj``), the token embedding (``adapter.embeddings[0]``,
e.g. ``model.embed_tokens``; it covers a tied output head too) or an untied output head
(``lm_head``). A linear-level entry replaces the block-level quantization and sparsity fields
for that one linear; the structural fields (``head_ratio``, ``channel_ratio``, ``drop``) exist
only at block level.

Example::

    schedule = Schedule(fingerprint, {"model.layers.0": Choice(bits=4, group_size=128)})
    schedule.save("runs/x/schedule.json")
    Schedule.load("runs/x/schedule.json").validate(model)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from .artifacts import read_artifact, write_artifact
from .errors import UserError

SCHEDULE_TYPE = "schedule"
SCHEDULE_VERSION = 1
ALLOWED_BITS = (2, 3, 4, 5, 6, 8, 16)
# llama.cpp's block types a choice may name (``gguf``), with the bit width each one stands for.
GGUF_TYPE_BITS = {"Q8_0": 8, "Q6_K": 6, "Q5_K": 5, "Q5_1": 5, "Q5_0": 5, "Q4_K": 4, "Q4_1": 4, "Q4_0": 4,
                  "Q3_K": 3, "Q2_K": 2}


class QuantMethod(str, Enum):
    """How integer codes are chosen: round-to-nearest, or GPTQ's error-compensating order."""

    RTN = "rtn"
    GPTQ = "gptq"


class Observer(str, Enum):
    """How a group's scale and zero are set: its min/max range, the clipped range with the least
    squared error (``mse``), HQQ's optimized zero and scale (``hqq``), or per group whichever of
    those rounds best, weighted by the input's importance (``best``: GPTQ's Hessian diagonal)."""

    MINMAX = "minmax"
    MSE = "mse"
    HQQ = "hqq"
    BEST = "best"


class SparsityPattern(str, Enum):
    """Which weights may be zeroed: none, any (per output row), or 2 of every 4 inputs."""

    NONE = "none"
    UNSTRUCTURED = "unstructured"
    TWO_FOUR = "2:4"


class PruneScore(str, Enum):
    """Importance used to pick what to remove: Wanda (|W| x input norm) or plain magnitude."""

    WANDA = "wanda"
    MAGNITUDE = "magnitude"


@dataclass(frozen=True)
class Choice:
    """The compression of one unit.

    ``bits`` 16 means "keep 16-bit" (no quantization). ``group_size`` None is per-channel
    (one scale per output row). ``sparsity`` is the fraction of weights zeroed: any value in
    [0, 1) for ``UNSTRUCTURED``, exactly 0.5 for ``TWO_FOUR``, 0 for ``NONE``.
    ``head_ratio`` removes that share of attention key/value groups (with their query
    heads), ``channel_ratio`` that share of MLP intermediate channels; ``drop`` removes the
    whole block. ``score`` ranks what unstructured and structured pruning remove.
    ``gguf`` names one of llama.cpp's block types (``Q4_K``...) instead of our group-wise
    codes: ``bits`` is then that type's width and ``group_size`` None, and the weights are
    quantized as llama.cpp does (importance-weighted by the calibration inputs), so a GGUF
    export writes them as measured.
    ``role_bits`` gives some linear roles of a block other bit widths than ``bits`` (e.g.
    ``(("down", 5), ("v", 6))``, llama.cpp's ``_M`` idea: the value projection and the MLP's
    down projection carry more of the error per byte); roles a family does not have (a fused
    ``qkv``) are left at ``bits``. :meth:`for_role` resolves it.
    """

    bits: int = 16
    group_size: int | None = 128
    method: QuantMethod = QuantMethod.RTN
    act_order: bool = False
    observer: Observer = Observer.MINMAX
    sparsity: float = 0.0
    pattern: SparsityPattern = SparsityPattern.NONE
    score: PruneScore = PruneScore.WANDA
    head_ratio: float = 0.0
    channel_ratio: float = 0.0
    drop: bool = False
    gguf: str | None = None
    role_bits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.gguf is not None and self.gguf in GGUF_TYPE_BITS:
            if self.bits == 16:
                object.__setattr__(self, "bits", GGUF_TYPE_BITS[self.gguf])
            object.__setattr__(self, "group_size", None)

    @property
    def quantized(self) -> bool:
        """Whether weights become integer codes (bits below 16)."""
        return self.bits < 16

    @property
    def changes_weights(self) -> bool:
        """Whether a linear under this choice differs from the original (codes or zeros)."""
        return self.quantized or self.pattern is not SparsityPattern.NONE

    @property
    def structural(self) -> bool:
        """Whether this choice changes shapes (heads, channels or the whole block)."""
        return self.drop or self.head_ratio > 0 or self.channel_ratio > 0

    def check(self, where: str) -> None:
        """Raise :class:`UserError` naming ``where`` if any field is out of range."""
        if self.gguf is not None:
            if self.gguf not in GGUF_TYPE_BITS:
                raise UserError(f"{where}: gguf must be one of {list(GGUF_TYPE_BITS)}, got {self.gguf!r}")
            if self.bits != GGUF_TYPE_BITS[self.gguf]:
                raise UserError(f"{where}: gguf {self.gguf} is {GGUF_TYPE_BITS[self.gguf]}-bit; "
                                f"leave bits out or set it to {GGUF_TYPE_BITS[self.gguf]}, not {self.bits}")
            if self.method is not QuantMethod.RTN:
                raise UserError(f"{where}: gguf types are quantized as llama.cpp does; use method 'rtn'")
        if self.bits not in ALLOWED_BITS:
            raise UserError(f"{where}: bits must be one of {ALLOWED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise UserError(f"{where}: group_size must be a positive integer or null, got {self.group_size}")
        for name in ("sparsity", "head_ratio", "channel_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"{where}: {name} must be in [0, 1), got {value}")
        if self.pattern is SparsityPattern.NONE and self.sparsity != 0:
            raise UserError(f"{where}: sparsity {self.sparsity} needs pattern 'unstructured' or '2:4'")
        if (self.observer is not Observer.MINMAX and self.method is QuantMethod.GPTQ and not self.act_order
                and self.quantized):
            raise UserError(f"{where}: observer {self.observer.value!r} needs act-order GPTQ (static groups) or rtn")
        if self.pattern is SparsityPattern.TWO_FOUR and self.sparsity != 0.5:
            raise UserError(f"{where}: pattern '2:4' means sparsity 0.5, got {self.sparsity}")
        if self.role_bits:
            if not self.quantized or self.gguf is not None:
                raise UserError(f"{where}: role_bits needs a quantizing choice with group-wise codes (bits below 16, "
                                f"no gguf type)")
            for role, bits in self.role_bits:
                if role not in LINEAR_ROLES:
                    raise UserError(f"{where}: role_bits names {role!r}; roles are {', '.join(LINEAR_ROLES)}")
                if bits not in ALLOWED_BITS or bits >= 16:
                    raise UserError(f"{where}: role_bits {role}={bits} must be one of {ALLOWED_BITS[:-1]}")

    def with_linear(self, override: Choice) -> Choice:
        """This block choice with the quantization/sparsity fields of a linear-level override
        (which is explicit: the block's ``role_bits`` no longer apply to that linear)."""
        return dataclasses.replace(self, role_bits=(), **{name: getattr(override, name) for name in LINEAR_FIELDS})

    def for_role(self, role: str) -> Choice:
        """The choice a linear of ``role`` (``q``, ``v``, ``down``...) gets: ``role_bits`` resolved."""
        if not self.role_bits:
            return self
        return dataclasses.replace(self, bits=dict(self.role_bits).get(role, self.bits), role_bits=())

    def linear_variants(self) -> list[Choice]:
        """Every distinct choice the block's linears get (one, or one per ``role_bits`` width)."""
        variants = [self.for_role("")]
        variants += [v for role, _ in self.role_bits if (v := self.for_role(role)) not in variants]
        return variants

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form (enums as their values; ``gguf`` and ``role_bits`` only when set, so
        older files read the same)."""
        out = {f.name: (v.value if isinstance(v := getattr(self, f.name), Enum) else v) for f in fields(self)
               if not (f.name == "gguf" and self.gguf is None) and f.name != "role_bits"}
        if self.role_bits:
            out["role_bits"] = dict(self.role_bits)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "choice") -> Choice:
        """Strict inverse of :meth:`to_json`: unknown keys and wrong types name the field."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected an object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
        values = {}
        for name, value in data.items():
            values[name] = _parse_field(name, value, f"{where}.{name}")
        choice = cls(**values)
        choice.check(where)
        return choice


def role_bits_label(role_bits: tuple[tuple[str, int], ...]) -> str:
    """``v6,down5``: the suffix of a mix's quantization label (``bits=4/g64:v6,down5``)."""
    return ",".join(f"{role}{bits}" for role, bits in role_bits)


LINEAR_ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up")
LINEAR_FIELDS = ("bits", "group_size", "method", "act_order", "observer", "sparsity", "pattern", "score", "gguf")
STRUCTURAL_FIELDS = ("head_ratio", "channel_ratio", "drop", "role_bits")
_ENUMS = {"method": QuantMethod, "observer": Observer, "pattern": SparsityPattern, "score": PruneScore}


def _parse_field(name: str, value: Any, where: str) -> Any:
    if name in _ENUMS:
        enum = _ENUMS[name]
        try:
            return enum(value)
        except ValueError:
            raise UserError(f"{where}: expected one of {[e.value for e in enum]}, got {value!r}") from None
    if name == "role_bits":
        if not isinstance(value, dict) or any(isinstance(b, bool) or not isinstance(b, int) for b in value.values()):
            raise UserError(f"{where}: expected a mapping of role to bit width such as {{'v': 6, 'down': 5}}, "
                            f"got {value!r}")
        return tuple(sorted(value.items()))
    if name == "gguf":
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: expected a GGUF type name such as 'Q4_K' or null, got {value!r}")
        return value
    if name in ("bits",):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if name == "group_size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{where}: expected an integer or null, got {value!r}")
        return value
    if name in ("act_order", "drop"):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _check_embedding_choice(name: str, choice: Choice) -> None:
    """The token embedding is quantized from its weights alone: no pruning, no GPTQ."""
    if choice.pattern is not SparsityPattern.NONE:
        raise UserError(f"{name}: the token embedding cannot be pruned; set only bits and group_size")
    if choice.quantized and choice.method is QuantMethod.GPTQ:
        raise UserError(f"{name}: the token embedding is quantized without activations; "
                        f"use method 'rtn', not 'gptq'")


@dataclass(frozen=True)
class Schedule:
    """A model fingerprint and a choice per unit; units not named keep their weights.

    ``meta`` is free-form JSON for what later stages add (search results, coordinates).
    ``source`` is the file it was loaded from, for messages (not saved, not compared).
    """

    fingerprint: str
    units: dict[str, Choice] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False, repr=False)

    @classmethod
    def uniform(cls, model, choice: Choice, *, fingerprint: str | None = None) -> Schedule:
        """The same block-level ``choice`` for every decoder block of ``model``."""
        from .models import adapter_for, model_fingerprint  # noqa: PLC0415 (keeps import light)

        adapter = adapter_for(model)
        count = len(adapter.blocks(model))
        return cls(fingerprint or model_fingerprint(model),
                   {f"{adapter.blocks_path}.{i}": choice for i in range(count)})

    def block_plan(self, blocks_path: str, index: int, linear_paths: list[str]) -> tuple[Choice, dict[str, Choice]]:
        """Block ``index``'s choice and the effective choice of each linear (path inside the block)."""
        block_name = f"{blocks_path}.{index}"
        base = self.units.get(block_name, Choice())
        linears = {}
        for path in linear_paths:
            override = self.units.get(f"{block_name}.{path}")
            linears[path] = base.with_linear(override) if override is not None else base
        return base, linears

    def validate(self, model, *, fingerprint: str | None = None) -> None:
        """Refuse a schedule made for another model, naming unknown units, or bad values.

        ``fingerprint`` saves recomputing :func:`autocompress.models.model_fingerprint`.
        """
        from .models import adapter_for, model_fingerprint  # noqa: PLC0415

        actual = fingerprint or model_fingerprint(model)
        if self.fingerprint != actual:
            raise UserError(f"{self.source or 'schedule'}: schedule was made for model {self.fingerprint}, but this "
                            f"model is {actual}; profile and search this model first, or give the model it was made "
                            f"for")
        from .compress.quant_embedding import head_is_tied  # noqa: PLC0415

        adapter = adapter_for(model)
        blocks = adapter.blocks(model)
        block_names = {f"{adapter.blocks_path}.{i}" for i in range(len(blocks))}
        linear_names = {f"{adapter.blocks_path}.{i}.{p}" for i in range(len(blocks)) for p in adapter.linears.values()}
        embedding = adapter.embeddings[0]
        for name, choice in self.units.items():
            if name in block_names:
                choice.check(name)
                continue
            if name == adapter.lm_head and head_is_tied(model):
                raise UserError(f"{name}: this model ties its output head to the token embedding; "
                                f"name the embedding unit '{embedding}' instead (it covers both)")
            if name in linear_names or name in (adapter.lm_head, embedding):
                choice.check(name)
                default = Choice()
                for attr in STRUCTURAL_FIELDS:
                    if getattr(choice, attr) != getattr(default, attr):
                        raise UserError(f"{name}: {attr} can only be set on a block, not on a linear layer")
                if name == embedding:
                    _check_embedding_choice(name, choice)
                continue
            raise UserError(f"schedule names unknown unit {name!r}: expected a block like "
                            f"'{adapter.blocks_path}.0', a linear like '{next(iter(sorted(linear_names)), '')}', "
                            f"'{embedding}' or '{adapter.lm_head}'")
        if len(blocks) and all(self.units.get(n, Choice()).drop for n in block_names):
            raise UserError("schedule drops every block; keep at least one")

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for ``schedule.json``."""
        return {"fingerprint": self.fingerprint,
                "units": {name: choice.to_json() for name, choice in self.units.items()},
                "meta": self.meta}

    @classmethod
    def from_json(cls, data: Any) -> Schedule:
        """Strict inverse of :meth:`to_json`."""
        if not isinstance(data, dict):
            raise UserError("schedule: expected an object")
        unknown = sorted(set(data) - {"fingerprint", "units", "meta"})
        if unknown:
            raise UserError(f"schedule: unknown field {unknown[0]!r} (known: fingerprint, units, meta)")
        if not isinstance(data.get("fingerprint"), str):
            raise UserError("schedule.fingerprint: expected a string")
        units = data.get("units", {})
        if not isinstance(units, dict):
            raise UserError("schedule.units: expected an object of unit name -> choice")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise UserError("schedule.meta: expected an object")
        for key in ("model", "data"):  # the model and data apply falls back to
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise UserError(f"schedule.meta.{key}: expected a string, got {meta[key]!r:.60}")
        return cls(data["fingerprint"],
                   {name: Choice.from_json(value, f"schedule.units[{name!r}]") for name, value in units.items()},
                   meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``schedule.json`` atomically (versioned artifact)."""
        return write_artifact(path, SCHEDULE_TYPE, SCHEDULE_VERSION, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a schedule written by :meth:`save`, strictly (errors name the file and the field)."""
        data = read_artifact(path, SCHEDULE_TYPE, SCHEDULE_VERSION)
        try:
            return dataclasses.replace(cls.from_json(data), source=str(path))
        except UserError as exc:
            raise UserError(f"{path}: {exc}; re-run `autocompress search` or fix the file") from None
