"""The rollout policy: the canary stages and the thresholds that guard them, read from YAML.

A policy file (every key optional; these are the defaults)::

    version: 1
    stages: [5, 25, 50, 100]   # percent of the traffic sent to the candidate, stage by stage
    min_requests: 100          # candidate requests served in a stage before it may be promoted
    min_shadow: 20             # shadow scores taken in a stage before it may be promoted
    window: 50                 # the most recent requests per arm judged for latency and errors
    shadow_window: 5           # the most recent shadow scores judged for quality
    min_samples: 20            # requests in both arms' windows before latency and errors are judged
    min_shadow_samples: 3      # shadow scores in the window before quality is judged
    thresholds:
      agreement: 0.7           # floor: mean top-1 agreement of the candidate with the original
      kl: 0.5                  # ceiling: mean per-token KL(original || candidate), nats
      latency: 2.0             # ceiling: candidate p95 latency / original p95 latency
      error_rate: 0.05         # ceiling: share of candidate requests that failed

Read strictly: an unknown key or a value of the wrong type is a :class:`UserError` naming it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError

VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    """The limits a candidate must stay within; crossing any one fails it over at once."""

    agreement: float = 0.7
    kl: float = 0.5
    latency: float = 2.0
    error_rate: float = 0.05


@dataclass(frozen=True)
class Policy:
    """Canary stages (percent of traffic) and the evidence each stage needs before the next."""

    stages: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    min_requests: int = 100
    min_shadow: int = 20
    window: int = 50
    shadow_window: int = 5
    min_samples: int = 20
    min_shadow_samples: int = 3
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self):
        stages = tuple(float(s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise UserError("policy: stages is empty; give at least one share, e.g. [5, 25, 50, 100]")
        if any(not 0 <= s <= 100 for s in stages) or list(stages) != sorted(set(stages)):
            raise UserError(f"policy: stages {list(stages)} must be increasing percentages between 0 and 100")
        for name in ("min_requests", "min_shadow", "min_samples", "min_shadow_samples"):
            if getattr(self, name) < 0:
                raise UserError(f"policy: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("window", "shadow_window"):
            if getattr(self, name) < 1:
                raise UserError(f"policy: {name} must be >= 1, got {getattr(self, name)}")
        if self.min_samples > self.window or self.min_shadow_samples > self.shadow_window:
            raise UserError("policy: min_samples must be <= window and min_shadow_samples <= shadow_window")
        t = self.thresholds
        if not 0 <= t.agreement <= 1 or not 0 <= t.error_rate <= 1 or t.kl < 0 or t.latency <= 0:
            raise UserError(f"policy: thresholds out of range ({asdict(t)}): agreement and error_rate lie in "
                            f"[0, 1], kl >= 0, latency > 0")

    def with_start(self, canary: float | None) -> Policy:
        """This policy starting at ``canary`` percent: that share, then every later stage above it."""
        if canary is None:
            return self
        if not 0 <= canary <= 100:
            raise UserError(f"--canary {canary:g}: expected a percentage between 0 and 100")
        stages = (float(canary), *(s for s in self.stages if s > canary))
        return Policy(**{**self.to_dict(), "stages": stages, "thresholds": self.thresholds})

    def to_dict(self) -> dict:
        """Plain JSON-able form (as written into the event log)."""
        data = asdict(self)
        data["stages"] = list(self.stages)
        return data


def _check_type(where: str, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"policy {where}: expected {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def policy_from_dict(data: dict, where: str = "policy") -> Policy:
    """A :class:`Policy` from a mapping (YAML or the event log), strictly checked."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("version", VERSION)
    if version != VERSION:
        raise UserError(f"{where}: version {version!r} is not supported (this autocompress reads version {VERSION})")
    known = {f.name: f for f in fields(Policy)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        if name == "stages":
            if not isinstance(value, list):
                raise UserError(f"{where} stages: expected a list of percentages, got {value!r}")
            kwargs[name] = tuple(_check_type(f"{where} stages", v, float) for v in value)
        elif name == "thresholds":
            if not isinstance(value, dict):
                raise UserError(f"{where} thresholds: expected a mapping, got {value!r}")
            names = {f.name for f in fields(Thresholds)}
            bad = sorted(set(value) - names)
            if bad:
                raise UserError(f"{where} thresholds: unknown key {bad[0]!r}; known keys: {', '.join(sorted(names))}")
            kwargs[name] = Thresholds(**{k: _check_type(f"{where} thresholds.{k}", v, float) for k, v in value.items()})
        else:
            kwargs[name] = _check_type(f"{where} {name}", value, int)
    return Policy(**kwargs)


def load_policy(path: str | Path | None) -> Policy:
    """The policy in the YAML file at ``path``; the defaults when ``path`` is None."""
    if path is None:
        return Policy()
    import yaml  # noqa: PLC0415

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"--policy {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--policy {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return policy_from_dict(data or {}, f"--policy {path}")
