"""What a search decides: one option per *slot*, and how options become a :class:`Schedule`.

A slot is a searchable unit of the space (a decoder block, or with ``granularity: linear`` a
linear layer, or a group of linears tied by the space's ``tie`` rule, which share one option).
Frozen units are not slots: they keep their weights.

An option is one bit width of the space (16 included) combined with at most one pruning
choice, labelled ``bits=4``, ``bits=3+2:4``, ``bits=16+heads=0.25``, or ``drop`` (a dropped
block has no bit width). The same labels are Optuna's categorical values, so a trial's
params are ``{slot name: option label}``.

Example::

    slots = build_slots(space, model)
    picks = {slot.name: "bits=4" for slot in slots}
    schedule = to_schedule(slots, picks, fingerprint)
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..errors import UserError
from ..schedule import Choice, Schedule
from .space import Granularity, SearchSpace


@dataclass(frozen=True)
class Option:
    """One option of a slot: ``bits`` (16 = kept) and an optional pruning probe label."""

    label: str
    bits: int
    prune: str | None
    choice: Choice

    @property
    def probe_labels(self) -> tuple[str, ...]:
        """The profile labels whose deltas add up to this option's predicted damage."""
        if self.choice.drop:
            return ("drop",)
        labels = (f"bits={self.bits}",) if self.bits < 16 else ()
        return labels + ((self.prune,) if self.prune else ())


@dataclass(frozen=True)
class Slot:
    """A searchable unit: ``members`` are schedule unit names sharing one option."""

    name: str
    block: int
    members: tuple[str, ...]
    options: tuple[Option, ...]

    def option(self, label: str) -> Option:
        """The option called ``label`` (UserError naming the known ones otherwise)."""
        for option in self.options:
            if option.label == label:
                return option
        raise UserError(f"slot {self.name}: unknown option {label!r} (known: {', '.join(o.label for o in self.options)})")


def space_options(space: SearchSpace) -> tuple[Option, ...]:
    """Every option of ``space``: each bit width alone, and with each pruning choice."""
    options = []
    prunes = space.prune_choices()
    for bits in space.bits:
        quant = space.quant_choice(bits)
        label = f"bits={bits}"
        options.append(Option(label, bits, None, quant))
        for prune_label, prune in prunes:
            if prune.drop:
                continue
            merged = dataclasses.replace(prune, bits=quant.bits, group_size=quant.group_size, method=quant.method)
            options.append(Option(f"{label}+{prune_label}", bits, prune_label, merged))
    if any(p.drop for _, p in prunes):
        options.append(Option("drop", 16, "drop", Choice(drop=True)))
    return tuple(options)


_BLOCK = re.compile(r"^(?P<path>.+)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")


def build_slots(space: SearchSpace, model) -> list[Slot]:
    """The slots of ``model`` under ``space`` (frozen units left out, tie rules applied)."""
    from ..models import adapter_for  # noqa: PLC0415

    adapter = adapter_for(model)
    options = space_options(space)
    units = space.units(model)
    prefix = adapter.blocks_path + "."
    if space.granularity is Granularity.BLOCK:
        return [Slot(u, int(u[len(prefix):]), (u,), options) for u in units]
    role_of = {path: role for role, path in adapter.linears.items()}
    slots: list[Slot] = []
    by_block: dict[int, list[str]] = {}
    for unit in units:
        index, _, path = unit[len(prefix):].partition(".")
        by_block.setdefault(int(index), []).append(path)
    for index, paths in by_block.items():
        taken: set[str] = set()
        block = f"{prefix}{index}"
        for tie in space.tie:
            members = [p for p in paths if role_of.get(p) in tie and p not in taken]
            if members:
                taken.update(members)
                roles = ",".join(role_of[p] for p in members)
                slots.append(Slot(f"{block}:{roles}", index, tuple(f"{block}.{p}" for p in members), options))
        slots += [Slot(f"{block}.{p}", index, (f"{block}.{p}",), options) for p in paths if p not in taken]
    slots.sort(key=lambda s: s.block)
    return slots


def to_schedule(slots: list[Slot], picks: dict[str, str], fingerprint: str, meta: dict | None = None) -> Schedule:
    """The schedule giving each slot's members the picked option (16-bit, unpruned ones left out)."""
    units = {}
    for slot in slots:
        option = slot.option(picks[slot.name])
        if option.choice == Choice() or (not option.choice.quantized and option.prune is None):
            continue
        for member in slot.members:
            units[member] = option.choice
    return Schedule(fingerprint, units, dict(meta or {}))


def schedule_picks(slots: list[Slot], schedule: Schedule) -> dict[str, str] | None:
    """The picks that give back ``schedule`` (the inverse of :func:`to_schedule`), or None when
    one of its choices is not an option of its slot (a schedule from another space)."""
    picks = {}
    for slot in slots:
        wanted = schedule.units.get(slot.members[0], Choice())
        match = next((o.label for o in slot.options if o.choice == wanted
                      or (wanted == Choice() and o.label == "bits=16")), None)
        if match is None:
            return None
        picks[slot.name] = match
    return picks


def uniform_picks(slots: list[Slot], label: str) -> dict[str, str]:
    """The same option ``label`` for every slot."""
    return {slot.name: label for slot in slots}
