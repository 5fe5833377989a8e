"""Budgets: limits a schedule must meet, parsed from ``--budget`` specs.

Specs (combine with commas or repeat ``--budget``)::

    memory=60MB      memory=45%      memory=1.5GiB     stored bytes, exact (% of the 16-bit model)
    avg-bits=3.5                                       bits per original decoder-linear weight,
                                                       scales and zeros counted
    params=70%       params=90M                        non-zero parameters (% of the original)
    latency=4ms@h100 latency=900us@cpu                 one decode step at batch B (cost model)

Example::

    budget = Budget.parse(["memory=50%,latency=2ms@h100"], MemoryModel.from_model(model))
    budget.fits(schedule), budget.violations(schedule), budget.evaluate(schedule)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..compress.memory import MemoryModel
from ..errors import UserError
from ..schedule import Schedule
from .cost import CostModel, device_named

_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}
_TIME_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3}
# Figure name and its index in CostModel's raw [bytes, weight bytes, params, seconds] vector.
_FIGURE = {"memory": "memory_bytes", "avg-bits": "avg_bits", "params": "params", "latency": "latency_ms"}
_RAW_INDEX = {"memory_bytes": 0, "avg_bits": 1, "params": 2, "latency_ms": 3}
_HELP = "expected memory=60MB|45%, avg-bits=3.5, params=70%|90M or latency=4ms@h100"


@dataclass(frozen=True)
class Limit:
    """One resolved limit: ``figure`` (a key of CostModel.figures) must be <= ``value``."""

    kind: str  # memory | avg-bits | params | latency
    spec: str
    figure: str
    value: float

    def describe(self, figure: float) -> str:
        """``figure`` in this limit's units, for messages."""
        return format_figure(self.figure, figure)


def format_figure(name: str, value: float) -> str:
    """A figure with its unit (``63.2 MB``, ``3.41 bits``, ``91.2M params``, ``1.84 ms``)."""
    if name == "memory_bytes":
        return f"{value / 1e6:.4g} MB"
    if name == "avg_bits":
        return f"{value:.3f} bits"
    if name == "params":
        return f"{value / 1e6:.4g}M params"
    return f"{value:.4g} ms"


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"budget {spec!r}: {text!r} is not a number; {_HELP}") from None
    if not value > 0:
        raise UserError(f"budget {spec!r}: the limit must be positive; {_HELP}")
    return value


def _split_specs(specs: list[str] | str) -> list[str]:
    if isinstance(specs, str):
        specs = [specs]
    parts = [p.strip() for spec in specs for p in spec.split(",")]
    if not parts or any(not p for p in parts):
        raise UserError(f"empty budget; {_HELP}")
    return parts


def _kinds(parts: list[str]) -> list[tuple[str, str, str]]:
    """(spec, kind, value) of each spec; an unknown or repeated kind is a UserError."""
    out, seen = [], set()
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _FIGURE:
            raise UserError(f"budget {part!r}: unknown kind {key!r}; {_HELP}")
        if key in seen:
            raise UserError(f"budget {part!r}: {key} is given twice; give each kind once")
        seen.add(key)
        out.append((part, key, value.strip().lower()))
    return out


def check_specs(specs: list[str] | str) -> None:
    """Refuse malformed budget specs before any model is loaded (:meth:`Budget.parse` resolves
    them against the model later); one :class:`UserError` line names the spec."""
    parts = _split_specs(specs)
    for part, key, value in _kinds(parts):
        _resolve(key, value, part, dict.fromkeys(_RAW_INDEX, 1.0))
        if key == "latency" and "@" in value:
            device_named(value.rpartition("@")[2])


@dataclass
class Budget:
    """Limits plus the cost model that prices schedules against them."""

    limits: list[Limit]
    cost: CostModel
    original: dict[str, float]

    @classmethod
    def parse(cls, specs: list[str] | str, memory_model: MemoryModel, cost_model: CostModel | None = None, *,
              batch: int = 1, context: int = 512, measure_latency: bool | None = None) -> Budget:
        """Parse budget specs; a ``latency=...@DEVICE`` limit sets the cost model's device.

        Without ``cost_model`` one is built (roofline on h100 unless a latency limit names a
        device). Every malformed spec is one :class:`UserError` line naming it.
        """
        parts = _split_specs(specs)
        devices = set()
        for part in parts:
            match = re.fullmatch(r"latency=[^@]*@(\S+)", part)
            if match:
                devices.add(device_named(match.group(1)).name)
        if len(devices) > 1:
            raise UserError(f"latency budgets on several devices ({', '.join(sorted(devices))}); give one device")
        if cost_model is None or (devices and cost_model.device.name not in devices):
            device = devices.pop() if devices else (cost_model.device.name if cost_model else "h100")
            cost_model = CostModel(memory_model, device=device, batch=cost_model.batch if cost_model else batch,
                                   context=cost_model.context if cost_model else context, measure=measure_latency)
        original = cost_model.original()
        limits = [Limit(key, part, _FIGURE[key], _resolve(key, value, part, original))
                  for part, key, value in _kinds(parts)]
        return cls(limits, cost_model, original)

    @property
    def specs(self) -> list[str]:
        """The specs as given."""
        return [limit.spec for limit in self.limits]

    def evaluate(self, schedule: Schedule) -> dict[str, float]:
        """The schedule's figures (memory exact; latency with :attr:`latency_source`)."""
        return self.cost.figures(schedule)

    @property
    def latency_source(self) -> str:
        """Where latency figures come from: ``roofline:h100`` or ``measured:cpu``."""
        return self.cost.latency_source

    def violations_of(self, figures: dict[str, float]) -> list[float]:
        """Per limit, figure / limit - 1 (<= 0 means met): Optuna's constraint values."""
        return [figures[limit.figure] / limit.value - 1.0 for limit in self.limits]

    def violations(self, schedule: Schedule) -> list[float]:
        """:meth:`violations_of` the schedule's figures."""
        return self.violations_of(self.evaluate(schedule))

    def fits(self, schedule: Schedule) -> bool:
        """Whether ``schedule`` meets every limit."""
        return all(v <= 0 for v in self.violations(schedule))

    def raw_limits(self) -> np.ndarray:
        """Limits in CostModel raw units [bytes, weight bytes, params, seconds] (inf where none)."""
        raw = np.full(4, np.inf)
        for limit in self.limits:
            value = limit.value
            if limit.figure == "avg_bits":
                value = value * self.cost.weights / 8.0
            elif limit.figure == "latency_ms":
                value = value / 1e3
            raw[_RAW_INDEX[limit.figure]] = value
        return raw

    def check_feasible(self, base: np.ndarray, tables: list[np.ndarray]) -> None:
        """Refuse a budget no option mix can meet, naming the minimum achievable figure."""
        low = base + sum(table.min(axis=0) for table in tables)
        figures = self.cost.to_figures(low)
        for limit in self.limits:
            if figures[limit.figure] > limit.value * (1 + 1e-12):
                raise UserError(f"budget {limit.spec} cannot be met with this search space: the smallest it reaches "
                                f"is {limit.kind}={limit.describe(figures[limit.figure])} "
                                f"(limit {limit.describe(limit.value)}); raise the limit or search a space with "
                                f"smaller choices")

    def to_json(self) -> dict:
        """Specs, resolved limits and the original model's figures."""
        return {"specs": self.specs, "limits": {l.figure: l.value for l in self.limits},
                "original": self.original, "latency_source": self.latency_source,
                "batch": self.cost.batch, "context": self.cost.context}


def _resolve(key: str, value: str, spec: str, original: dict[str, float]) -> float:
    if key == "avg-bits":
        return _number(value, spec)
    if key == "latency":
        match = re.fullmatch(r"([0-9.eE+-]+)\s*(s|ms|us)(?:@\S+)?", value)
        if not match:
            raise UserError(f"budget {spec!r}: expected a time like 4ms@h100 or 900us@cpu")
        return _number(match.group(1), spec) * _TIME_UNITS[match.group(2)]
    if value.endswith("%"):
        percent = _number(value[:-1], spec)
        if percent > 100:
            raise UserError(f"budget {spec!r}: a percentage above 100 is no budget; give at most 100%")
        return percent / 100.0 * original[_FIGURE[key]]
    units = _SIZE_UNITS if key == "memory" else _COUNT_UNITS
    match = re.fullmatch(r"([0-9.eE+-]+)\s*([a-z]*)", value)
    if not match or match.group(2) not in units:
        example = "60MB, 1.5GiB or 45%" if key == "memory" else "90M, 0.1B or 70%"
        raise UserError(f"budget {spec!r}: expected a size like {example}")
    return _number(match.group(1), spec) * units[match.group(2)]
