"""What a search decides: one option per *slot*, and how options become a :class:`Schedule`.

A slot is a searchable unit of the space (a decoder block, or with ``granularity: linear`` a
linear layer, or a group of linears tied by the space's ``tie`` rule, which share one option).
Frozen units are not slots: they keep their weights.

An option is one quantization of the space (bit width and group size; 16 bits included)
combined with at most one pruning choice, labelled ``bits=4``, ``bits=4/g64`` (a space with
several group sizes), ``bits=3+2:4``, ``bits=16+heads=0.25``, or ``drop`` (a dropped block has
no bit width). The token embedding (with a tied head) is one more slot when the space has
``embedding_bits``; an untied head is another; their options are ``embed:bits=6/g64``... The same labels are Optuna's categorical values, so a trial's
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
    """One option of a slot: ``bits`` (16 = kept), its quantization label and an optional pruning label."""

    label: str
    bits: int
    prune: str | None
    choice: Choice
    quant: str | None = None

    @property
    def probe_labels(self) -> tuple[str, ...]:
        """The profile labels whose deltas add up to this option's predicted damage."""
        if self.choice.drop:
            return ("drop",)
        labels = (self.quant or f"bits={self.bits}",) if self.bits < 16 else ()
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
    quants = space.quant_choices() + ([("bits=16", Choice())] if 16 in space.bits else [])
    for label, quant in quants:
        options.append(Option(label, quant.bits, None, quant, label))
        for prune_label, prune in prunes:
            if prune.drop:
                continue
            merged = dataclasses.replace(prune, bits=quant.bits, group_size=quant.group_size, method=quant.method,
                                         act_order=quant.act_order, observer=quant.observer, gguf=quant.gguf,
                                         role_bits=quant.role_bits)
            options.append(Option(f"{label}+{prune_label}", quant.bits, prune_label, merged, label))
    if any(p.drop for _, p in prunes):
        options.append(Option("drop", 16, "drop", Choice(drop=True)))
    return tuple(options)


_BLOCK = re.compile(r"^(?P<path>.+)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")


def embedding_options(space: SearchSpace) -> tuple[Option, ...]:
    """The options of an embedding or untied-head slot: 16 bits, and each of the space's embedding choices."""
    if not space.embedding_bits:
        return ()
    kept = Option("embed:bits=16", 16, None, Choice(), None)
    return (kept,) + tuple(Option(label, c.bits, None, c, label) for label, c in space.embedding_choices())


def embedding_slots(space: SearchSpace, model) -> list[Slot]:
    """The token embedding slot (covering a tied head) and, for an untied model, the head's slot."""
    from ..compress.quant_embedding import embedding_unit, head_is_tied  # noqa: PLC0415
    from ..models import adapter_for  # noqa: PLC0415

    options = embedding_options(space)
    if not options:
        return []
    names = [embedding_unit(model)] + ([] if head_is_tied(model) else [adapter_for(model).lm_head])
    return [Slot(name, -1, (name,), options) for name in names if not space.is_frozen(name)]


def build_slots(space: SearchSpace, model) -> list[Slot]:
    """The slots of ``model`` under ``space`` (frozen units left out, tie rules applied).

    Embedding slots (block index -1) come first, then the blocks' slots in block order.
    """
    from ..models import adapter_for  # noqa: PLC0415

    adapter = adapter_for(model)
    options = space_options(space)
    units = space.units(model)
    prefix = adapter.blocks_path + "."
    extra = embedding_slots(space, model)
    if space.granularity is Granularity.BLOCK:
        return extra + [Slot(u, int(u[len(prefix):]), (u,), options) for u in units]
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
    return extra + slots


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
                      or (wanted == Choice() and o.label in ("bits=16", "embed:bits=16"))), None)
        if match is None:
            return None
        picks[slot.name] = match
    return picks


def uniform_picks(slots: list[Slot], label: str) -> dict[str, str]:
    """The same option ``label`` for every slot."""
    return {slot.name: label for slot in slots}
