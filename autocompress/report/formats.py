"""Small helpers the report's data modules share: number parsing, formatting, unit ordering."""
from __future__ import annotations

import math
import re
from typing import Any

from ..schedule import Choice, SparsityPattern

MIB = 2**20


def get_field(record: dict[str, Any] | None, *names: str, default: Any = None) -> Any:
    """The first of ``names`` present (and not None) in ``record``."""
    if not record:
        return default
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return default


def as_number(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``model.layers.2`` before ``model.layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_bytes(count: float | None) -> str:
    """``812 B``, ``3.4 KiB``, ``12.3 MiB``, ``1.20 GiB`` (or ``-``)."""
    if count is None:
        return "-"
    if count < 2**10:
        return f"{count:.0f} B"
    if count < 2**20:
        return f"{count / 2**10:.1f} KiB"
    if count < 2**30:
        return f"{count / MIB:,.1f} MiB"
    return f"{count / 2**30:.2f} GiB"


def format_number(value: float | None, digits: int = 4) -> str:
    """A number with ``digits`` significant digits (or ``-``)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def choice_label(choice: Choice) -> str:
    """A short label of a choice in the profile's vocabulary (``bits=3``, ``bits=4 + 2:4``, ``drop``)."""
    if choice.drop:
        return "drop"
    parts = [choice.gguf or f"bits={choice.bits}"] if choice.quantized else []
    if choice.role_bits:
        parts[0] += " (" + ", ".join(f"{role} {bits}" for role, bits in choice.role_bits) + ")"
    if choice.pattern is SparsityPattern.TWO_FOUR:
        parts.append("2:4")
    elif choice.pattern is SparsityPattern.UNSTRUCTURED and choice.sparsity > 0:
        parts.append(f"sparsity={choice.sparsity:g}")
    if choice.head_ratio > 0:
        parts.append(f"heads={choice.head_ratio:g}")
    if choice.channel_ratio > 0:
        parts.append(f"channels={choice.channel_ratio:g}")
    return " + ".join(parts) or "16-bit"
