"""Transfer a learned schedule onto another model, and seed a search with it.

:func:`transfer_schedule` reads the source schedule's model-agnostic coordinates, gives every
unit of the target the source's choice at the same role and relative depth (bits interpolated
linearly between the two nearest source depths, pruning ratios from the nearest one, both
snapped to the target's search space; with a block signature on both sides, a target block's
depth is that of the source block it aligns to, see :mod:`.alignment`), then
:func:`~autocompress.transfer.repair.repair`
makes it meet the target budget exactly. Fused projections match their parts: a Phi-3 ``qkv``
takes the mean bits of Llama's ``q``/``k``/``v``, and the other way round. No profile of the
target is needed; one is used when given.

Example::

    target = transfer_schedule(Schedule.load("runs/x/schedule.json"), new_model, budget)
    target.meta["transfer"]["units"]["model.layers.0"]   # where it came from
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import UserError
from ..schedule import Choice, QuantMethod, Schedule
from .alignment import align_blocks, block_signature, signature_from_profile
from .check import distinct, exchanges, pick_checked
from .coordinates import (BLOCK_ROLE, HEAD_ROLE, AgnosticChoice, agnostic_choices, check_source_meta, describe,
                          model_coordinates, model_shape, relative_depth)
from .repair import candidate_choices, repair, snap
from .sensitivity import (FUSED, SPLIT, LossTable, from_choices, from_predictor, from_profile, from_summary,
                          interpolate_over_depth)


def load_source(source: str | Path) -> Schedule:
    """A schedule from ``schedule.json`` or a run directory holding one (clear error otherwise)."""
    path = Path(source)
    if path.is_dir():
        path = path / "schedule.json"
    if not path.is_file():
        raise UserError(f"{source}: no schedule found; give a schedule.json or a run directory with one "
                        f"(written by `autocompress search`)")
    schedule = Schedule.load(path)
    check_source_meta(schedule, str(path))
    return schedule


def _matching(role: str, entries: list[AgnosticChoice]) -> list[AgnosticChoice]:
    """Source entries standing in for a target unit of ``role`` (fused and split roles match their parts)."""
    same = [e for e in entries if e.role == role]
    if same:
        return same
    if role in FUSED:
        parts = [e for e in entries if e.role in FUSED[role]]
        if parts:
            return parts
    if role in SPLIT:
        fused = [e for e in entries if e.role == SPLIT[role]]
        if fused:
            return fused
    if role == BLOCK_ROLE:
        return [e for e in entries if e.role not in (BLOCK_ROLE, HEAD_ROLE)]
    if role != HEAD_ROLE:
        return [e for e in entries if e.role == BLOCK_ROLE]
    return []


def map_choice(entries: list[AgnosticChoice], depth: float, candidates: list[Choice]) -> tuple[Choice, list[str]]:
    """The source's choice at relative ``depth``: bits linear in depth, pruning from the nearest
    source unit, snapped to ``candidates``; also the source units it came from."""
    by_depth: dict[float, list[AgnosticChoice]] = {}
    for e in entries:
        by_depth.setdefault(round(e.relative_depth, 9), []).append(e)
    depths = sorted(by_depth)
    nearest = min(depths, key=lambda d: (abs(d - depth), d))
    near = by_depth[nearest]

    def mean_bits(group: list[AgnosticChoice]) -> float:
        # Weighted by size, so a fused linear's bits mean the same stored precision as its parts'.
        weight = sum(e.relative_size for e in group) or 1.0
        return sum(e.choice.bits * e.relative_size for e in group) / weight

    bits = interpolate_over_depth([(d, mean_bits(by_depth[d])) for d in depths], depth)
    quantized = [e for e in near if not e.choice.drop]
    if not quantized:  # the nearest source block was dropped: drop here too
        mapped = Choice(drop=True)
    else:
        structural = max(quantized, key=lambda e: (e.choice.head_ratio + e.choice.channel_ratio + e.choice.sparsity))
        mapped = dataclasses.replace(structural.choice, bits=max(2, min(16, round(bits))), drop=False, role_bits=())
    lower = [d for d in depths if d <= depth]
    upper = [d for d in depths if d >= depth]
    used = {nearest, lower[-1] if lower else nearest, upper[0] if upper else nearest}
    sources = sorted({e.name for d in used for e in by_depth[d]})
    return snap(mapped, candidates), sources


def _default_space(entries: list[AgnosticChoice]):
    """A space allowing every bit width and the pruning kinds the source schedule used."""
    from ..search.space import space_from_dict  # noqa: PLC0415

    choices = [e.choice for e in entries]
    quant = [c for c in choices if c.quantized]
    group = max({c.group_size for c in quant}, key=[c.group_size for c in quant].count) if quant else 128
    method = max({c.method for c in quant}, key=[c.method for c in quant].count).value if quant else "rtn"
    linear = any(e.role not in (BLOCK_ROLE, HEAD_ROLE) for e in entries)
    data = {"name": "transferred", "granularity": "linear" if linear else "block", "group_size": group,
            "method": method, "bits": [2, 3, 4, 8, 16],
            "sparsity": sorted({c.sparsity for c in choices if c.pattern.value == "unstructured"}),
            "two_four": any(c.pattern.value == "2:4" for c in choices)}
    if not linear:
        data.update(head_ratio=sorted({c.head_ratio for c in choices if c.head_ratio > 0}),
                    channel_ratio=sorted({c.channel_ratio for c in choices if c.channel_ratio > 0}),
                    drop=any(c.drop for c in choices))
    return space_from_dict(data, "transferred space")


def losses_for(model, units: list[str], coordinates, *, profile=None, source: Schedule | None = None,
               predictor=None, space=None, mapped: dict[str, Choice] | None = None) -> LossTable:
    """The best available loss table for ``units`` of ``model`` (see :mod:`.sensitivity`): the
    target's profile, else the source's profile summary, else the predictor, else the
    sensitivity implied by the ``mapped`` source choices, else the prior."""
    if profile is not None:
        return from_profile(profile, coordinates)
    summary = (source.meta.get("source_profile") if source is not None else None)
    if isinstance(summary, dict) and summary.get("units"):
        return from_summary(summary, coordinates, units)
    if predictor is not None and space is not None:
        return from_predictor(predictor, model, coordinates, units, space.probe_choices())
    if mapped:
        return from_choices(mapped, coordinates)
    return LossTable(coordinates, {}, "prior")


def source_signature(schedule: Schedule) -> list[float] | None:
    """The per-block influence :func:`~.coordinates.describe` stored for the source, or None."""
    stored = schedule.meta.get("source_signature")
    if not isinstance(stored, dict) or stored.get("kind") != "block_influence":
        return None
    values = stored.get("values")
    if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    blocks = schedule.meta.get("source_model", {}).get("blocks")
    return [float(v) for v in values] if blocks in (None, len(values)) else None


def aligned_coordinates(source_schedule: Schedule, target_model, *, signature_tokens=None,
                        target_signature: list[float] | None = None, bos: int | None = None) -> tuple[dict, dict]:
    """The target's coordinates with each block's relative depth replaced by that of the source
    block it aligns to (:mod:`.alignment`), and a record of how: ``{"by": "block_influence",
    "source_blocks": [...], "target_signature": [...]}`` or ``{"by": "relative_depth"}`` when the
    source schedule holds no signature or neither ``signature_tokens`` nor ``target_signature``
    is given. ``bos``: the target tokenizer's BOS id, put before every signature window."""
    coordinates = model_coordinates(target_model)
    source = source_signature(source_schedule)
    if source is None or (signature_tokens is None and target_signature is None):
        return coordinates, {"by": "relative_depth"}
    target = target_signature
    if target is None:
        target = block_signature(target_model, signature_tokens, bos=bos)
    blocks = 1 + max(c.block for c in coordinates.values())
    if len(target) != blocks:
        raise UserError(f"target signature has {len(target)} values for {blocks} blocks")
    matched = align_blocks(source, target)
    depths = [relative_depth(j, len(source)) for j in matched]
    aligned = {name: dataclasses.replace(c, relative_depth=depths[c.block]) if c.block >= 0 else c
               for name, c in coordinates.items()}
    return aligned, {"by": "block_influence", "source_blocks": matched,
                     "target_signature": [round(v, 8) for v in target]}


def transfer_schedule(source_schedule: Schedule, target_model, budget, *, space=None, profile=None,
                      predictor=None, signature_tokens=None, target_signature: list[float] | None = None,
                      check_tokens=None, check_count: int = 6, bos: int | None = None) -> Schedule:
    """Map ``source_schedule`` onto ``target_model`` and repair it to meet ``budget`` exactly.

    ``space`` (a :class:`~autocompress.search.space.SearchSpace`) says which choices the target
    may take (default: every bit width plus the pruning kinds the source used). ``profile`` is
    a profile of the *target* (optional: without it the source's profile summary prices the
    repair, else ``predictor``, else a noise prior). The result carries coordinates for the
    target (``meta["agnostic"]``) and ``meta["transfer"]``: per unit the source units it came
    from, the mapped and the final choice, and where the loss estimates came from.

    With ``signature_tokens`` (1-D calibration ids; one forward pass of the target) or a
    precomputed ``target_signature``, and a source schedule that stores its blocks' signature,
    target blocks are matched to source blocks by block influence (:mod:`.alignment`) instead
    of raw relative depth, so a model with blocks removed keeps each block's own choice and
    sensitivity; ``meta["transfer"]["alignment"]`` records the match.

    With ``check_tokens`` (1-D calibration ids of the target), the repaired schedule, its
    ``check_count`` best-ranked exchanges (two same-size slots trading choices, see
    :mod:`.check`) and a third as many byte-neutral :func:`neighbours` (one slot up, one down)
    are measured end to end on them, and the lowest KL is kept;
    ``meta["transfer"]["check"]`` lists what was measured. ``bos`` is the target tokenizer's
    BOS id when it adds one (:func:`~autocompress.data.bos_id`): the signature and check
    windows then start with it.
    """
    from ..compress.memory import MemoryModel  # noqa: PLC0415
    from ..models import adapter_for, model_fingerprint  # noqa: PLC0415

    adapter_for(target_model)  # unknown family -> one clear line
    if profile is not None:
        profile.check_matches(model_fingerprint(target_model))
        if signature_tokens is None and target_signature is None:
            target_signature = signature_from_profile(profile)  # measured already: free
    coordinates, alignment = aligned_coordinates(source_schedule, target_model, signature_tokens=signature_tokens,
                                                 target_signature=target_signature, bos=bos)
    entries = agnostic_choices(source_schedule)
    space = space or _default_space(entries)
    units = space.units(target_model)
    memory = MemoryModel.from_model(target_model)
    block_units = {f"{memory.blocks_path}.{i}" for i in range(len(memory.blocks))}
    mapped: dict[str, Choice] = {}
    origin: dict[str, list[str]] = {}
    for name in units:
        matching = _matching(coordinates[name].role, entries)
        candidates = candidate_choices(space, name in block_units)
        if not matching:
            mapped[name], origin[name] = snap(Choice(), candidates), []
            continue
        mapped[name], origin[name] = map_choice(matching, coordinates[name].relative_depth, candidates)
    head = [e for e in entries if e.role == HEAD_ROLE]
    # A tied head is quantized through the embedding unit (it covers both).
    head_unit = memory.embedding_name if memory.head_tied else memory.head_name
    if head and head_unit not in units and head[0].choice.pattern.value == "none":
        mapped[head_unit] = dataclasses.replace(head[0].choice, method=QuantMethod.RTN, act_order=False)
    if block_units and all(mapped.get(b, Choice()).drop for b in block_units):
        keep = min(block_units & set(mapped))
        mapped[keep] = snap(Choice(), candidate_choices(space, True))
    fingerprint = model_fingerprint(target_model)
    draft = Schedule(fingerprint, {k: v for k, v in mapped.items() if v != Choice()})
    losses = losses_for(target_model, units, coordinates, profile=profile, source=source_schedule,
                        predictor=predictor, space=space, mapped=mapped)
    repaired = repair(draft, target_model, budget, space, losses, memory=memory)
    check = None
    if check_tokens is not None:
        others = neighbours(repaired, target_model, budget, space, losses, max(1, check_count // 3))
        repaired, check = pick_checked(repaired, target_model, budget, space, losses, check_tokens,
                                       count=check_count, memory=memory, others=others, bos=bos)
    result = describe(repaired, target_model, profile, signature=alignment.get("target_signature"))
    source_model = source_schedule.meta.get("source_model", {})
    meta = dict(result.meta)
    meta["transfer"] = {
        "source_model": source_model,
        "target_model": model_shape(target_model).to_json(),
        "losses": losses.source,
        "alignment": alignment,
        "check": check,
        "space": space.to_json(),
        "bytes": memory.schedule_bytes(result),
        "units": {name: {"sources": origin.get(name, []),
                         "source_depth": round(coordinates[name].relative_depth, 6),
                         "mapped": mapped.get(name, Choice()).to_json(),
                         "final": result.units.get(name, Choice()).to_json()} for name in units},
    }
    return dataclasses.replace(result, meta=meta)


def neighbours(schedule: Schedule, model, budget, space, losses: LossTable, count: int = 4,
               units: list[str] | None = None) -> list[Schedule]:
    """Up to ``count`` schedules one swap away from ``schedule`` that still fit ``budget``:
    the slot that gains most from one more bit takes it, paid by the slot that loses least
    from one bit less (a different pair each time). A slot is a unit, or the linears the
    space ties together, which move as one (as the search moves them)."""
    from ..search.decisions import build_slots  # noqa: PLC0415

    wanted = set(units if units is not None else space.units(model))
    groups = [s.members for s in build_slots(space, model) if set(s.members) <= wanted]
    bits = sorted(space.bits)

    def step(choice: Choice, direction: int) -> Choice | None:
        if choice.drop or choice.bits not in bits:
            return None
        index = bits.index(choice.bits) + direction
        if not 0 <= index < len(bits):
            return None
        return dataclasses.replace(choice, bits=bits[index], role_bits=())

    def group_loss(members, choice: Choice) -> float:
        return sum(losses.loss(u, choice) for u in members)

    ups, downs = [], []
    for members in groups:
        now = schedule.units.get(members[0], Choice())
        up, down = step(now, 1), step(now, -1)
        if up is not None:
            ups.append((group_loss(members, now) - group_loss(members, up), members, up))
        if down is not None:
            downs.append((group_loss(members, down) - group_loss(members, now), members, down))
    ups.sort(key=lambda m: -m[0])
    downs.sort(key=lambda m: m[0])
    out: list[Schedule] = []
    seen = {tuple(sorted((k, v) for k, v in schedule.units.items()))}
    for _, up_members, up in ups:
        for _, down_members, down in downs:
            if down_members == up_members:
                continue
            units_now = {**schedule.units, **{u: up for u in up_members}, **{u: down for u in down_members}}
            candidate = dataclasses.replace(schedule, units={k: v for k, v in units_now.items() if v != Choice()})
            key = tuple(sorted(candidate.units.items()))
            if key in seen or not budget.fits(candidate):
                continue
            seen.add(key)
            out.append(candidate)
            break
        if len(out) >= count:
            break
    return out


def warm_start_schedules(source: str | Path, model, space, budget, profile=None, *, count: int = 2,
                         signature_tokens=None) -> list[Schedule]:
    """Schedules to enqueue as a search's first trials on ``model``: the transfer of ``source``
    (a ``schedule.json`` or a run directory) repaired to ``budget`` with the source's own
    knowledge, the same repaired with the target's ``profile`` when given (it can trade the
    source's measured choices for the additive optimum, so both are tried), then up to
    ``count`` neighbours of the better-informed one, priced by the best knowledge at hand
    (on SmolLM2 -> a derived model, neighbours priced by the source's sensitivity at the
    same relative depth were poor: dropped blocks shift depths). All fit ``budget``;
    duplicates are dropped. Blocks are aligned by signature (see :func:`transfer_schedule`)
    measured on ``signature_tokens``, else read from ``profile``'s block influence. Then up to
    ``count`` :func:`~.check.exchanges` of it (the same choices, two same-size units trading
    them), which the search measures where the transfer's placement was wrong."""
    source_schedule = load_source(source)
    target_signature = signature_from_profile(profile) if profile is not None and signature_tokens is None else None
    options = {"signature_tokens": signature_tokens, "target_signature": target_signature}
    found = [transfer_schedule(source_schedule, model, budget, space=space, **options)]
    if profile is not None:
        found.append(transfer_schedule(source_schedule, model, budget, space=space, profile=profile, **options))
    center = found[-1]
    if center.meta["transfer"]["alignment"]["by"] != "relative_depth":
        options["target_signature"] = center.meta["transfer"]["alignment"]["target_signature"]
    coordinates, _ = aligned_coordinates(source_schedule, model, **options)
    units = space.units(model)
    mapped = {name: Choice.from_json(entry["mapped"]) for name, entry in center.meta["transfer"]["units"].items()}
    losses = losses_for(model, units, coordinates, profile=profile, source=source_schedule, space=space,
                        mapped=mapped)
    found += neighbours(center, model, budget, space, losses, count, units)
    # the same mix of choices on other units of the same size: where the source's placement is wrong
    found += exchanges(center, model, budget, space, losses, count)
    return distinct(found)


__all__ = ["transfer_schedule", "warm_start_schedules", "load_source", "map_choice", "neighbours", "losses_for",
           "aligned_coordinates", "source_signature"]
