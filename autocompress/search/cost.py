"""What a schedule costs: exact memory, average bits, parameters, and decode latency.

Memory is :class:`~autocompress.compress.memory.MemoryModel`'s exact count (what
``save_compressed`` writes). ``avg_bits`` is stored bits of the decoder linears' weights
(codes, scales and zeros) per *original* weight, so pruned weights count as zero bits.
``params`` counts non-zero parameters (unstructured and 2:4 zeros are not parameters).

Latency is one decode step (batch ``B`` tokens, ``context`` tokens of KV cache per sequence):

* ``roofline:DEVICE``: each linear takes max(bytes moved / bandwidth, flops / peak) on a named
  device (:data:`DEVICES`), attention reads its KV cache the same way;
* ``measured:DEVICE``: the linears are timed for real (our QuantLinear / nn.Linear at batch B,
  the packed reference kernel on CPU) on a device at hand; attention stays by roofline.

Every figure is additive over blocks (and over linears within a block), so the search prices
one slot option in isolation: :meth:`CostModel.slot_costs`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..compress.memory import STORAGE_BYTES, LinearShape, MemoryModel, linear_bytes, pruned_shapes
from ..compress.prune import kept_heads
from ..errors import UserError
from ..schedule import Choice, Schedule, SparsityPattern

FIGURES = ("memory_bytes", "avg_bits", "params", "latency_ms")


@dataclass(frozen=True)
class Device:
    """A named device for the roofline: memory bandwidth (bytes/s) and dense 16-bit peak (flop/s)."""

    name: str
    bandwidth: float
    peak_flops: float
    torch_device: str


# Datasheet figures (dense bf16/fp16 tensor-core peaks, HBM/GDDR bandwidth). The CPU entry is a
# nominal two-channel DDR4/5 desktop; measure on the machine itself for a real CPU figure.
DEVICES = {
    "h100": Device("h100", 3.35e12, 989e12, "cuda"),
    "h200": Device("h200", 4.8e12, 989e12, "cuda"),
    "a100": Device("a100", 2.039e12, 312e12, "cuda"),
    "rtx4090": Device("rtx4090", 1.008e12, 165e12, "cuda"),
    "cpu": Device("cpu", 40e9, 0.5e12, "cpu"),
}


def device_named(name: str) -> Device:
    """The :class:`Device` called ``name`` (UserError listing the known ones)."""
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise UserError(f"unknown device {name!r} for latency: expected one of {', '.join(DEVICES)}") from None


def device_at_hand(device: Device) -> bool:
    """Whether ``device`` is this machine's CPU, or a CUDA GPU of that name is present."""
    if device.torch_device == "cpu":
        return True
    return torch.cuda.is_available() and device.name in torch.cuda.get_device_name(0).lower().replace(" ", "")


def _nonzero_fraction(choice: Choice) -> float:
    return 1.0 - choice.sparsity if choice.pattern is not SparsityPattern.NONE else 1.0


@dataclass
class LinearTimer:
    """Measures a linear of a given shape and quantization at batch ``batch`` on ``device``; cached."""

    device: str
    batch: int
    repeats: int = 20
    cache: dict = field(default_factory=dict)

    @torch.no_grad()
    def seconds(self, shape: LinearShape, choice: Choice) -> float:
        """Median wall time of one forward (seconds)."""
        from ..compress.quantize import QuantLinear, quantize_rtn  # noqa: PLC0415

        key = (shape.out, shape.inp, choice.bits, choice.group_size)
        if key in self.cache:
            return self.cache[key]
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(shape.out, shape.inp, generator=generator) * 0.05
        if choice.quantized:
            module = QuantLinear.from_quantized(quantize_rtn(weight, choice.bits, choice.group_size))
        else:
            module = torch.nn.Linear(shape.inp, shape.out, bias=False)
            module.weight.data.copy_(weight)
        module = module.to(self.device)
        x = torch.randn(self.batch, shape.inp, device=self.device)
        times = []
        for step in range(self.repeats + 3):
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            tick = time.perf_counter()
            module(x)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= 3:
                times.append(time.perf_counter() - tick)
        self.cache[key] = float(np.median(times))
        return self.cache[key]


class CostModel:
    """Prices schedules of one model: memory exactly, latency by roofline or measurement.

    Example::

        cost = CostModel(MemoryModel.from_model(model), device="h100", batch=1)
        cost.figures(schedule)   # {"memory_bytes": ..., "avg_bits": ..., "params": ..., "latency_ms": ...}
    """

    def __init__(self, memory: MemoryModel, *, device: str = "h100", batch: int = 1, context: int = 512,
                 measure: bool | None = None):
        self.memory = memory
        self.device = device_named(device)
        self.batch, self.context = batch, context
        at_hand = device_at_hand(self.device)
        if measure and not at_hand:
            raise UserError(f"cannot measure latency on {self.device.name}: no such device here; "
                            f"use the roofline (drop --measure-latency) or run on that device")
        self.measured = at_hand if measure is None else bool(measure)
        self.timer = LinearTimer(self.device.torch_device, batch) if self.measured else None
        self.latency_source = f"{'measured' if self.measured else 'roofline'}:{self.device.name}"
        self.weights = sum(s.out * s.inp for b in memory.blocks for s in b.linears.values())
        self._block_cache: dict = {}

    # -- per-part figures ------------------------------------------------------------------
    def _linear_seconds(self, shape: LinearShape, choice: Choice) -> float:
        if self.timer is not None:
            return self.timer.seconds(shape, choice)
        weight = linear_bytes(LinearShape(shape.out, shape.inp, shape.bias), choice)
        moved = weight + self.batch * (shape.inp + shape.out) * STORAGE_BYTES
        flops = 2.0 * self.batch * shape.out * shape.inp
        return max(moved / self.device.bandwidth, flops / self.device.peak_flops)

    def _attention_seconds(self, index: int, choice: Choice) -> float:
        layout = self.memory.blocks[index].layout
        if choice.head_ratio > 0:
            layout = kept_heads(layout, choice.head_ratio)
        kv = self.batch * self.context * 2 * layout.num_kv_heads * layout.head_dim * STORAGE_BYTES
        flops = 4.0 * self.batch * self.context * layout.num_heads * layout.head_dim
        return max(kv / self.device.bandwidth, flops / self.device.peak_flops)

    def block_figures(self, index: int, choice: Choice, linear_choices: dict[str, Choice] | None = None) -> np.ndarray:
        """[bytes, linear weight bytes, non-zero params, seconds] of block ``index``."""
        key = (index, choice, tuple(sorted((linear_choices or {}).items(), key=lambda kv: kv[0])))
        cached = self._block_cache.get(key)
        if cached is not None:
            return cached
        if choice.drop:
            out = np.zeros(4)
        else:
            shapes = self.memory.blocks[index]
            total_bytes = shapes.other_elements * STORAGE_BYTES
            weight_bytes, params = 0.0, float(shapes.other_elements)
            seconds = self._attention_seconds(index, choice)
            for role, shape in pruned_shapes(shapes, choice).items():
                linear = (linear_choices or {}).get(self.memory.paths[role], choice).for_role(role)
                total_bytes += linear_bytes(shape, linear)
                weight_bytes += linear_bytes(LinearShape(shape.out, shape.inp, False), linear)
                params += shape.out * shape.inp * _nonzero_fraction(linear) + (shape.out if shape.bias else 0)
                seconds += self._linear_seconds(shape, linear)
            out = np.array([total_bytes, weight_bytes, params, seconds], dtype=np.float64)
        self._block_cache[key] = out
        return out

    def base_figures(self, head_choice: Choice | None, embedding_choice: Choice | None = None) -> np.ndarray:
        """[bytes, 0, params, seconds] outside the blocks (embeddings, norm, output head).

        ``embedding_choice`` is the token embedding unit's: its codes count one parameter each,
        and a head tied to it runs its matmul on those codes (priced at their bytes).
        """
        head = head_choice or Choice()
        params = self.memory.base_elements + (self.memory.head.out * self.memory.head.inp
                                              if head.quantized and self.memory.head_tied else 0)
        if self.memory.head_tied and embedding_choice is not None and embedding_choice.quantized:
            head = embedding_choice
        seconds = self._linear_seconds(self.memory.head, head)
        return np.array([self.memory.base_bytes(head_choice, embedding_choice), 0.0, params, seconds],
                        dtype=np.float64)

    def to_figures(self, raw: np.ndarray) -> dict[str, float]:
        """Turn summed [bytes, weight bytes, params, seconds] into the named figures."""
        return {"memory_bytes": int(round(raw[0])), "avg_bits": float(8.0 * raw[1] / self.weights),
                "params": int(round(raw[2])), "latency_ms": float(1e3 * raw[3])}

    def raw(self, schedule: Schedule) -> np.ndarray:
        """Summed raw figures of ``schedule`` (see :meth:`block_figures`)."""
        paths = list(self.memory.paths.values())
        total = self.base_figures(schedule.units.get(self.memory.head_name),
                                  schedule.units.get(self.memory.embedding_name)).copy()
        for index in range(len(self.memory.blocks)):
            choice, linears = schedule.block_plan(self.memory.blocks_path, index, paths)
            overrides = {p: c for p, c in linears.items() if c != choice}
            total += self.block_figures(index, choice, overrides or None)
        return total

    def figures(self, schedule: Schedule) -> dict[str, float]:
        """memory_bytes (exact), avg_bits, params (non-zero), latency_ms of ``schedule``."""
        figures = self.to_figures(self.raw(schedule))
        figures["memory_bytes"] = self.memory.schedule_bytes(schedule)
        return figures

    def original(self) -> dict[str, float]:
        """The figures of the uncompressed (all 16-bit) model."""
        return self.figures(Schedule("", {}))

    # -- per-slot tables for allocation ------------------------------------------------------
    def slot_costs(self, slots) -> tuple[np.ndarray, list[np.ndarray]]:
        """The all-16-bit raw figures, and per slot an [options, 4] array of raw deltas from 16 bits.

        Any schedule's raw figures are the first plus the picked rows (everything is additive).
        A slot of the token embedding or of an untied head (block index -1) is priced by
        :meth:`base_figures`.
        """
        paths = list(self.memory.paths.values())
        path_of = {f"{self.memory.blocks_path}.{i}.{p}": p for i in range(len(self.memory.blocks)) for p in paths}
        plain = Choice()
        base = self.raw(Schedule("", {}))
        tables = []
        for slot in slots:
            rows = []
            if slot.members in ((self.memory.embedding_name,), (self.memory.head_name,)):
                embedding = slot.members[0] == self.memory.embedding_name
                plain_base = self.base_figures(None)
                for option in slot.options:
                    now = (self.base_figures(None, option.choice) if embedding
                           else self.base_figures(option.choice))
                    rows.append(now - plain_base)
                tables.append(np.array(rows))
                continue
            for option in slot.options:
                if slot.members == (f"{self.memory.blocks_path}.{slot.block}",):
                    now = self.block_figures(slot.block, option.choice)
                else:
                    now = self.block_figures(slot.block, plain, {path_of[m]: option.choice for m in slot.members})
                rows.append(now - self.block_figures(slot.block, plain))
            tables.append(np.array(rows))
        return base, tables
