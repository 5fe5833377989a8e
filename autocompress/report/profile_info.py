"""What the report shows of a profile and a schedule, as plain data (no plotting).

The sensitivity matrix, the additivity check and proxy correlations, the linguistic-role
curves, and the chosen schedule unit by unit beside each unit's measured sensitivity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..profile.artifact import Profile
from ..schedule import Choice, Schedule, role_bits_label
from .formats import as_number, choice_label, format_number, natural_key


@dataclass
class SensitivityInfo:
    """KL per (unit, probe choice): ``kl[i][j]`` for ``units[i]`` under ``labels[j]`` (None: not measured)."""

    units: list[str]
    labels: list[str]
    kl: list[list[float | None]]


def sensitivity_info(profile: Profile) -> SensitivityInfo:
    """The unit x choice KL matrix of a profile, units in model order, labels in measured order."""
    labels = profile.labels()
    for unit in profile.units:  # labels measured but absent from ``choices`` still get a column
        labels += [label for label in unit.kl if label not in labels]
    units = sorted(profile.units, key=lambda u: (u.block, natural_key(u.name)))
    return SensitivityInfo([u.name for u in units], labels,
                           [[as_number(u.kl.get(label)) for label in labels] for u in units])


def additivity_rows(profile: Profile) -> list[tuple[str, str, str, str]]:
    """(bits, predicted KL, measured KL, measured/predicted) of the profile's additivity checks:
    every unit changed at once, against the sum of single-unit KLs."""
    rows = []
    for check in sorted(profile.additivity, key=lambda c: c.bits):
        ratio = check.measured_kl / check.predicted_kl if check.predicted_kl > 0 else None
        rows.append((f"bits={check.bits}", format_number(check.predicted_kl), format_number(check.measured_kl),
                     format_number(ratio, 3)))
    return rows


def proxy_table(profile: Profile) -> tuple[list[str], list[list[str]]]:
    """Spearman rho of each cheap proxy with the measured KL, as a proxy x choice matrix.

    The profile keys correlations ``"proxy ~ choice"`` (or just ``"proxy"``, shown in the
    column ``all``); proxies are ordered by their largest absolute rho.
    """
    cells: dict[str, dict[str, float | None]] = {}
    columns: list[str] = []
    for key, rho in profile.proxy_spearman.items():
        proxy, _, choice = (part.strip() for part in key.partition("~"))
        choice = choice or "all"
        cells.setdefault(proxy, {})[choice] = as_number(rho)
        if choice not in columns:
            columns.append(choice)
    order = sorted(cells, key=lambda p: -max((abs(v) for v in cells[p].values() if v is not None), default=0))
    rows = [[proxy] + [format_number(cells[proxy].get(c), 3) for c in columns] for proxy in order]
    return ["proxy"] + columns, rows


@dataclass
class RoleCurveInfo:
    """Selectivity of each linguistic probe task per layer (layer 0 = embeddings) and each block's dominant task."""

    layers: list[int]
    curves: dict[str, list[float | None]]
    dominant: list[tuple[int, str]]


def role_curve_info(profile: Profile) -> RoleCurveInfo:
    """The role curves across depth; falls back to the per-unit ``roles`` when the profile has no curves."""
    curves = {task: [as_number(v) for v in values] for task, values in profile.role_curves.items()}
    if not curves:  # rebuild from block units (layer i + 1 is the output of block i)
        blocks = sorted({u.block: u for u in profile.units if u.roles}.items())
        tasks = sorted({task for _, unit in blocks for task in unit.roles})
        curves = {task: [None] + [as_number(unit.roles.get(task)) for _, unit in blocks] for task in tasks}
    length = max((len(v) for v in curves.values()), default=0)
    dominant = sorted({(u.block, u.dominant_role) for u in profile.units if u.dominant_role})
    return RoleCurveInfo(list(range(length)), curves, dominant)


def _ranges(numbers: list[int]) -> str:
    """``0-3, 7, 12-14`` from sorted integers."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def dominant_groups(info: RoleCurveInfo) -> list[tuple[str, str]]:
    """(task, the blocks it dominates as ranges), tasks in order of their first block."""
    groups: dict[str, list[int]] = {}
    for block, role in info.dominant:
        groups.setdefault(role, []).append(block)
    return [(role, _ranges(sorted(blocks))) for role, blocks in groups.items()]


# --- schedule --------------------------------------------------------------------------------

@dataclass
class ScheduleInfo:
    """The chosen schedule unit by unit, beside the profile's sensitivity of that unit."""

    units: list[str]
    labels: list[str]
    bits: list[int]
    sparsity: list[float]
    head_ratio: list[float]
    channel_ratio: list[float]
    drop: list[bool]
    chosen_kl: list[float | None]  # additive KL of the chosen choice under the profile
    worst_kl: list[float | None]  # the unit's largest measured KL over the probe choices
    average_bits: float | None


def _chosen_kl(choice: Choice, kl: dict[str, float]) -> float | None:
    """The profile's additive KL of ``choice``: the sum of its single-axis parts (None if one is unmeasured)."""
    if choice.drop:
        return as_number(kl.get("drop"))
    label = choice_label(dataclasses.replace(choice, role_bits=()))
    if label == "16-bit":
        return 0.0
    mix = f":{role_bits_label(choice.role_bits)}" if choice.role_bits else ""
    values = []
    for part in label.split(" + "):
        # A quantization is labelled with its group size when the space offered several, and
        # with ``embed:`` on the embedding unit; a mix adds its roles' widths (``:v6,down5``).
        group = "ch" if choice.group_size is None else choice.group_size
        names = [f"{part}{mix}", f"{part}/g{group}{mix}", f"embed:{part}", f"embed:{part}/g{group}"] \
            if part.startswith("bits=") else [part]
        values.append(next((as_number(kl[n]) for n in names if n in kl), None))
    return None if any(v is None for v in values) else sum(values)


def schedule_info(schedule: Schedule, profile: Profile | None = None) -> ScheduleInfo:
    """Per-unit bits and ratios of ``schedule``, with each unit's KL from ``profile`` where measured.

    ``average_bits`` weighs units by their parameter count when the profile knows it.
    """
    names = sorted(schedule.units, key=natural_key)
    units = {u.name: u for u in profile.units + profile.extra_units} if profile else {}
    info = ScheduleInfo(names, [], [], [], [], [], [], [], [], None)
    weighted, weights = 0.0, 0
    for name in names:
        choice = schedule.units[name]
        unit = units.get(name)
        info.labels.append(choice_label(choice))
        info.bits.append(0 if choice.drop else choice.bits)
        info.sparsity.append(choice.sparsity)
        info.head_ratio.append(choice.head_ratio)
        info.channel_ratio.append(choice.channel_ratio)
        info.drop.append(choice.drop)
        info.chosen_kl.append(_chosen_kl(choice, unit.kl) if unit else None)
        measured = [v for v in (as_number(x) for x in unit.kl.values()) if v is not None] if unit else []
        info.worst_kl.append(max(measured) if measured else None)
        weight = unit.parameters if unit and unit.parameters else 1
        if not choice.drop:
            weighted += choice.bits * weight
            weights += weight
    info.average_bits = weighted / weights if weights else None
    return info
