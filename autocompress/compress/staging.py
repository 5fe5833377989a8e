"""Building blocks of staged compression (:mod:`~autocompress.compress.staged`).

* units: a block with its linear overrides, or the output head;
* their order, most robust first: the profile's measured KL for the unit's choice, else a
  cheap proxy (how much a block's own output changes when compressed alone);
* step sizes: the next units until a share of the current size would be removed;
* compressing one step in place, calibrated on the model as it is now;
* dropped blocks: identities in place while staging, removed for real in checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..models import adapter_for
from ..schedule import Choice, QuantMethod, Schedule, SparsityPattern
from .apply import DroppedBlock, _compress_head, block_head_layout, compress_block, compress_block_, needs_calibration
from .calibrate import capture_block_inputs, run_block
from .memory import MemoryModel
from .prune import drop_blocks, kept_channels, kept_heads, set_submodule
from .quant_embedding import quantize_embeddings_


@dataclass(frozen=True)
class StageUnit:
    """A unit of staging: a block (with its linear overrides) or the output head."""

    name: str
    index: int | None  # block index; None for the output head
    entries: dict[str, Choice]  # the schedule entries this unit applies


# ---------------------------------------------------------------------------------------
# Units, sizes and order


def stage_units(model: nn.Module, schedule: Schedule) -> list[StageUnit]:
    """Group the schedule's entries into staging units (entries that change nothing are left out)."""
    adapter = adapter_for(model)
    units = []
    for index in range(len(adapter.blocks(model))):
        name = f"{adapter.blocks_path}.{index}"
        entries = {unit: choice for unit, choice in schedule.units.items()
                   if (unit == name or unit.startswith(name + ".")) and choice != Choice()}
        if entries:
            units.append(StageUnit(name, index, entries))
    for name in (adapter.embeddings[0], adapter.lm_head):  # the token table (a tied head with it), the head
        choice = schedule.units.get(name)
        if choice is not None and choice != Choice():
            units.append(StageUnit(name, None, {name: choice}))
    return units


def schedule_of(fingerprint: str, units: list[StageUnit], meta: dict | None = None) -> Schedule:
    """The schedule made of ``units``' entries."""
    return Schedule(fingerprint, {k: v for u in units for k, v in u.entries.items()}, dict(meta or {}))


def unit_weight(memory: MemoryModel, unit: StageUnit, fingerprint: str) -> float:
    """Bytes a unit removes; a unit that removes none (sparsity, a tied head) counts half its size."""
    alone = schedule_of(fingerprint, [unit])
    dense = memory.schedule_bytes(Schedule(fingerprint))
    saving = dense - memory.schedule_bytes(alone)
    if saving > 0:
        return float(saving)
    if unit.index is None:
        return 0.5 * memory.head.out * memory.head.inp * 2
    return 0.5 * memory.block_bytes(unit.index, Choice())


def next_step(pending: list[StageUnit], weights: dict[str, float], current_bytes: int,
              fraction: float) -> list[StageUnit]:
    """The next units in order until ``fraction`` of ``current_bytes`` would be exceeded (at least one)."""
    cap, taken, removed = fraction * current_bytes, [], 0.0
    for unit in pending:
        if taken and removed + weights[unit.name] > cap:
            break
        taken.append(unit)
        removed += weights[unit.name]
    return taken


def _axes(choice: Choice) -> list[tuple[str, float]]:
    """The probe kinds a choice is made of, as (kind, value) pairs of profile labels."""
    axes = []
    if choice.drop:
        return [("drop", 1.0)]
    if choice.quantized:
        axes.append(("bits", float(choice.bits)))
    if choice.head_ratio > 0:
        axes.append(("heads", choice.head_ratio))
    if choice.channel_ratio > 0:
        axes.append(("channels", choice.channel_ratio))
    if choice.pattern.value == "2:4":
        axes.append(("2:4", 1.0))
    elif choice.sparsity > 0:
        axes.append(("sparsity", choice.sparsity))
    return axes


def _nearest_kl(kl: dict[str, float], kind: str, value: float) -> float | None:
    options = []
    for label, measured in kl.items():
        name, _, text = label.partition("=")
        if name != kind:
            continue
        try:
            options.append((abs(float(text) - value) if text else 0.0, measured))
        except ValueError:
            continue
    return min(options)[1] if options else None


def profile_scores(profile, units: list[StageUnit]) -> dict[str, float] | None:
    """Each unit's summed profile KL for its choice (None if the profile cannot price every unit)."""
    scores = {}
    for unit in units:
        total, found = 0.0, False
        for entry, choice in unit.entries.items():
            measured = [u for u in profile.units if u.name == entry]
            if not measured and entry == unit.name:
                measured = [u for u in profile.units if u.name.startswith(unit.name + ".")]
            for measured_unit in measured:
                for kind, value in _axes(choice):
                    kl = _nearest_kl(measured_unit.kl, kind, value) if kind not in ("drop", "2:4") \
                        else measured_unit.kl.get(kind)
                    if kl is not None:
                        total, found = total + kl, True
        if not found:
            return None
        scores[unit.name] = total
    return scores


@torch.no_grad()
def proxy_scores(model: nn.Module, units: list[StageUnit], rows: torch.Tensor, fingerprint: str,
                 batch_size: int = 8) -> dict[str, float]:
    """Relative change of each block's own output when compressed alone with round-to-nearest.

    ``||block'(x) - block(x)||^2 / ||block(x)||^2`` on the original block's inputs ``x``
    (a few calibration rows). The output head gets +inf: without a profile it goes last.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    paths = list(adapter.linears.values())
    by_index = {u.index: u for u in units if u.index is not None}
    scores = {u.name: math.inf for u in units if u.index is None}
    if not by_index:
        return scores
    inputs = capture_block_inputs(model, rows, batch_size=batch_size)
    for index in range(max(by_index) + 1):
        out = run_block(blocks[index], inputs, batch_size=batch_size)
        unit = by_index.get(index)
        if unit is not None:
            choice, linears = schedule_of(fingerprint, [unit]).block_plan(adapter.blocks_path, index, paths)
            rtn = {path: replace(c, method=QuantMethod.RTN) for path, c in linears.items()}
            compressed = compress_block(blocks[index], index, model, replace(choice, method=QuantMethod.RTN),
                                        inputs, linear_choices=rtn, batch_size=batch_size)
            changed = run_block(compressed, inputs, batch_size=batch_size)
            scores[unit.name] = float((changed - out).pow(2).sum() / out.pow(2).sum().clamp(min=1e-12))
        inputs = inputs.with_hidden(out)
    return scores


# ---------------------------------------------------------------------------------------
# Compressing one step, in place


@contextlib.contextmanager
def _real_first_block(model: nn.Module, stand_in: nn.Module):
    """Put a real block at position 0 while capturing inputs (the capture hook stops before it runs)."""
    blocks = adapter_for(model).blocks(model)
    first = blocks[0]
    if not isinstance(first, DroppedBlock):
        yield
        return
    blocks[0] = stand_in
    try:
        yield
    finally:
        blocks[0] = first


@torch.no_grad()
def compress_step_(model: nn.Module, units: list[StageUnit], rows: torch.Tensor | None, fingerprint: str,
                   teacher: nn.Module, batch_size: int = 8) -> None:
    """Compress ``units`` of ``model`` in place, calibrating on the model as it is now.

    A dropped block becomes a :class:`~autocompress.compress.apply.DroppedBlock` in place. A
    block compressed before (a gradual plan's earlier level) is taken from where it is to the
    step's choice: head and channel counts as ``teacher``'s block would get them, importance
    scored on its current weights.
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    paths = list(adapter.linears.values())
    step = schedule_of(fingerprint, units)
    plans = {u.index: step.block_plan(adapter.blocks_path, u.index, paths) for u in units if u.index is not None}
    # A block compressed at an earlier (gradual) level: ratios become ratios of what is left,
    # and packed weights dense again, so pruning and re-quantizing act on the current weights.
    originals = adapter.blocks(teacher)
    for index, (choice, linears) in plans.items():
        plans[index] = (relative_choice(choice, blocks[index], originals[index], model), linears)
        densify_(blocks[index])
    head_choice = step.units.get(adapter.lm_head)
    head_gptq = head_choice is not None and head_choice.quantized and head_choice.method is QuantMethod.GPTQ
    needed = [i for i, (c, linears) in plans.items() if needs_calibration(c, linears)]
    last = len(blocks) if head_gptq else max(needed, default=-1)
    if last >= 0 and rows is None:
        raise ValueError("this step needs calibration tokens (Wanda scores or GPTQ Hessians)")
    inputs = None
    if last >= 0:
        with _real_first_block(model, adapter.blocks(teacher)[0]):
            inputs = capture_block_inputs(model, rows, batch_size=batch_size)
    for index in range(len(blocks)):
        if index in plans:
            choice, linears = plans[index]
            block = compress_block_(blocks[index], model, choice, inputs if index <= last else None,
                                    linear_choices=linears, batch_size=batch_size)
            if choice.drop:
                blocks[index] = block
        if inputs is not None and index < last:
            inputs = inputs.with_hidden(run_block(blocks[index], inputs, batch_size=batch_size))
    if head_choice is not None:
        _compress_head(model, adapter, head_choice, inputs if head_gptq else None, batch_size)
    embedding_choice = step.units.get(adapter.embeddings[0])
    if embedding_choice is not None:
        quantize_embeddings_(model, embedding_choice, None)


# ---------------------------------------------------------------------------------------
# Dropped blocks in checkpoints


def dropped_indices(model: nn.Module) -> list[int]:
    """Positions of the blocks that stand in for dropped ones."""
    return [i for i, b in enumerate(adapter_for(model).blocks(model)) if isinstance(b, DroppedBlock)]


@contextlib.contextmanager
def physically_dropped(model: nn.Module):
    """Remove the dropped stand-ins for real inside the ``with`` (to save), restore them after."""
    dropped = dropped_indices(model)
    if not dropped:
        yield model
        return
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    layer_idx = [(m, m.layer_idx) for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    config = model.config
    saved = (config.num_hidden_layers, copy.copy(getattr(config, "layer_types", None)))
    drop_blocks(model, dropped)
    try:
        yield model
    finally:
        set_submodule(model, adapter.blocks_path, blocks)
        for module, value in layer_idx:
            module.layer_idx = value
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]


def reinsert_dropped(model: nn.Module, dropped: list[int], like: nn.Module) -> nn.Module:
    """Put :class:`DroppedBlock` stand-ins back at ``dropped`` (inverse of a physical drop).

    ``like`` is the original model, whose config gives the full depth.
    """
    if not dropped:
        return model
    adapter = adapter_for(model)
    kept = iter(adapter.blocks(model))
    total = like.config.num_hidden_layers
    new = nn.ModuleList([DroppedBlock() if i in set(dropped) else next(kept) for i in range(total)])
    for index, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    set_submodule(model, adapter.blocks_path, new)
    model.config.num_hidden_layers = total
    if getattr(like.config, "layer_types", None) is not None:
        model.config.layer_types = list(like.config.layer_types)
    return model


# ---------------------------------------------------------------------------------------
# Gradual plans: a unit moves through intermediate choices (Minitron-style iterative pruning)

BIT_LADDER = (8, 4, 3, 2)  # the allowed bits below 16, coarsest first


def level_choice(choice: Choice, level: int, levels: int) -> Choice:
    """``choice`` at ``level`` of ``levels``: head/channel ratios at ``level/levels`` of their
    final value, bits down the ladder 16 -> 8 -> 4 -> 3 -> 2 (rungs spread evenly over the
    levels). Drops, sparsity and 2:4 only arrive at the last level; the last level is ``choice``."""
    if level >= levels or choice.drop:
        return choice if level >= levels else Choice()
    share = level / levels
    rungs = [b for b in BIT_LADDER if b >= choice.bits] if choice.quantized else []
    rung = math.ceil(share * len(rungs)) - 1
    bits = rungs[rung] if rung >= 0 else 16
    role_bits = tuple((role, max(b, bits)) for role, b in choice.role_bits) if bits < 16 else ()
    return replace(choice, bits=bits, role_bits=role_bits, head_ratio=choice.head_ratio * share,
                   channel_ratio=choice.channel_ratio * share, sparsity=0.0,
                   pattern=SparsityPattern.NONE)


def level_unit(unit: StageUnit, level: int, levels: int) -> StageUnit:
    """The sub-unit taking ``unit`` to ``level`` of ``levels`` (named ``name@level/levels``)."""
    entries = {k: level_choice(c, level, levels) for k, c in unit.entries.items()}
    return StageUnit(f"{unit.name}@{level}/{levels}", unit.index, entries)


def base_name(name: str) -> str:
    """The unit a (gradual) sub-unit name belongs to."""
    return name.partition("@")[0]


def unit_level(name: str) -> int:
    """The level of a sub-unit name (0 for a whole unit)."""
    _, at, rest = name.partition("@")
    return int(rest.split("/")[0]) if at else 0


def _level_removals(memory: MemoryModel, units: list[StageUnit], levels: int,
                    fingerprint: str) -> list[tuple[int, int]]:
    """(bytes before, bytes after) of each level when every unit moves together."""
    def at(unit: StageUnit, k: int) -> StageUnit:  # the output head moves at the last level only
        return level_unit(unit, k if unit.index is not None or k == levels else 0, levels)

    sizes = [memory.schedule_bytes(schedule_of(fingerprint, [at(u, k) for u in units]))
             if k else memory.schedule_bytes(Schedule(fingerprint)) for k in range(levels + 1)]
    return list(zip(sizes, sizes[1:]))


def gradual_levels(memory: MemoryModel, units: list[StageUnit], fingerprint: str, fraction: float,
                   most: int = 8) -> int:
    """The fewest levels (at most ``most``) with every level removing at most ``fraction`` of the
    size it starts from."""
    for levels in range(1, most + 1):
        if all(before - after <= fraction * before
               for before, after in _level_removals(memory, units, levels, fingerprint)):
            return levels
    return most


def gradual_plan(memory: MemoryModel, units: list[StageUnit], fingerprint: str,
                 levels: int) -> tuple[list[StageUnit], dict[str, float]]:
    """Sub-units, level by level (each level in ``units``' order), and the bytes each removes.

    The output head takes its final choice at the last level only. A sub-unit that changes
    no size before the last level (a head ratio rounding to the same head count, bits
    already at that rung) is left out; one that already reaches the final size (and has no
    sparsity to come) takes the final choice and ends the unit. The last level always
    stays, weighed as :func:`unit_weight` when it removes no bytes (sparsity).
    """
    plan, weights, done = [], {}, set()
    for level in range(1, levels + 1):
        for unit in units:
            if unit.name in done or (unit.index is None and level < levels):
                continue  # the output head is compressed once, at the last level
            sub = level_unit(unit, level, levels)
            final = schedule_of(fingerprint, [unit])
            if (level < levels and all(c.pattern is SparsityPattern.NONE for c in unit.entries.values())
                    and memory.schedule_bytes(schedule_of(fingerprint, [sub])) == memory.schedule_bytes(final)):
                # Same counts and bits as the final choice already: this level is the last one.
                sub, _ = StageUnit(sub.name, unit.index, dict(unit.entries)), done.add(unit.name)
            previous = schedule_of(fingerprint, [level_unit(unit, level - 1, levels)]) if level > 1 \
                else Schedule(fingerprint)
            removed = memory.schedule_bytes(previous) - memory.schedule_bytes(schedule_of(fingerprint, [sub]))
            if removed <= 0 and level < levels:
                continue
            plan.append(sub)
            weights[sub.name] = float(removed) if removed > 0 else unit_weight(memory, unit, fingerprint)
    return plan, weights


def relative_choice(choice: Choice, block: nn.Module, original: nn.Module, model: nn.Module) -> Choice:
    """``choice`` (ratios of the original block) as ratios of ``block`` as it is now, so a
    block already pruned at an earlier level ends with exactly the final head and channel counts."""
    if choice.drop or (choice.channel_ratio == 0 and choice.head_ratio == 0):
        return choice
    adapter = adapter_for(model)
    changes = {}
    if choice.channel_ratio > 0:
        now = adapter.mlp_channels(block)
        target = kept_channels(adapter.mlp_channels(original), choice.channel_ratio)
        changes["channel_ratio"] = (now - target) / now if target < now else 0.0
    if choice.head_ratio > 0:
        now = block_head_layout(block, adapter, model.config).num_kv_heads
        target = kept_heads(block_head_layout(original, adapter, model.config), choice.head_ratio).num_kv_heads
        changes["head_ratio"] = (now - target) / now if target < now else 0.0
    return replace(choice, **changes)


@torch.no_grad()
def densify_(block: nn.Module) -> None:
    """Replace quantized linears (and LoRA wrappers) in ``block`` by dense ones holding their
    dequantized weight (plus the adapters' update), so a later level can prune or re-quantize them."""
    from .lora import LoRAQuantLinear  # noqa: PLC0415
    from .quantize import QuantLinear  # noqa: PLC0415

    for name, module in list(block.named_modules()):
        if isinstance(module, LoRAQuantLinear):
            weight = module.dense_base() + module.delta_weight().float()
            base = module.base
        elif isinstance(module, QuantLinear):
            weight, base = module.dequantized_weight(), module
        else:
            continue
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        dense.weight.data.copy_(weight)
        if base.bias is not None:
            dense.bias.data.copy_(base.bias.detach())
        dense.requires_grad_(False)
        set_submodule(block, name, dense)
