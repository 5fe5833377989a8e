"""Exact memory accounting, from shapes and choices only (nothing is compressed to count it).

The bytes of a compressed model are what :func:`~autocompress.compress.saving.save_compressed`
writes as tensor data: for a quantized linear its packed codes plus an fp16 scale and zero
per (row, group), the narrow last group included; 2 bytes per element for everything kept in
16 bits (embeddings, norms, biases, unquantized linears, the output head unless it is chosen);
tied embeddings once; pruned heads, channels and dropped blocks not at all. Unstructured and
2:4 sparsity do not change storage (the zeros are stored). A quantized token embedding unit
is priced like a linear with one row per vocabulary entry; a head tied to it shares its codes
and costs nothing more.

Build a :class:`MemoryModel` once per model; its methods are plain arithmetic, cheap enough
for a search to call millions of times.

Example::

    mm = MemoryModel.from_model(model)
    mm.block_bytes(3, Choice(bits=4, group_size=128))
    model_bytes(model, schedule)   # == the saved tensor bytes
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autocompress.kernels import packing

from ..models import HeadLayout, adapter_for, head_layout
from ..schedule import Choice, Schedule
from .prune import kept_channels, kept_heads
from .quantize import effective_group_size

STORAGE_BYTES = 2  # fp16 / bf16 for everything not quantized


@dataclass(frozen=True)
class LinearShape:
    """One linear's shape: ``out`` x ``inp`` weight, plus a bias of ``out`` if ``bias``."""

    out: int
    inp: int
    bias: bool


@dataclass(frozen=True)
class BlockShapes:
    """What memory accounting needs to know of one original block."""

    layout: HeadLayout
    channels: int
    linears: dict[str, LinearShape]  # role -> shape
    other_elements: int  # norms and any other 16-bit tensors of the block


def linear_bytes(shape: LinearShape, choice: Choice) -> int:
    """Stored bytes of one linear under ``choice`` (quantized or 16-bit), bias included."""
    bias = shape.out * STORAGE_BYTES if shape.bias else 0
    if not choice.quantized:
        return shape.out * shape.inp * STORAGE_BYTES + bias
    if choice.gguf is not None:
        from ..export.gguf_quants import row_bytes  # noqa: PLC0415
        from .gguf_linear import resolved_type  # noqa: PLC0415

        return shape.out * row_bytes(resolved_type(choice.gguf, shape.inp), shape.inp) + bias
    group = effective_group_size(choice.group_size, shape.inp)
    return packing.packed_nbytes(shape.out, shape.inp, choice.bits, group, scale_bytes=STORAGE_BYTES) + bias


def pruned_shapes(shapes: BlockShapes, choice: Choice) -> dict[str, LinearShape]:
    """Each linear's shape after the block's structured pruning (heads, channels)."""
    layout = kept_heads(shapes.layout, choice.head_ratio) if choice.head_ratio > 0 else shapes.layout
    channels = kept_channels(shapes.channels, choice.channel_ratio) if choice.channel_ratio > 0 else shapes.channels
    hd = layout.head_dim
    rows = {"q": layout.num_heads * hd, "k": layout.num_kv_heads * hd, "v": layout.num_kv_heads * hd,
            "qkv": (layout.num_heads + 2 * layout.num_kv_heads) * hd,
            "gate": channels, "up": channels, "gate_up": 2 * channels}
    cols = {"o": layout.num_heads * hd, "down": channels}
    return {role: LinearShape(rows.get(role, s.out), cols.get(role, s.inp), s.bias)
            for role, s in shapes.linears.items()}


def _shape(module: nn.Module) -> LinearShape:
    return LinearShape(module.out_features, module.in_features, getattr(module, "bias", None) is not None)


@dataclass(frozen=True)
class MemoryModel:
    """Shapes of an (uncompressed) model, enough to price any schedule exactly."""

    blocks_path: str
    paths: dict[str, str]  # role -> path inside a block
    blocks: tuple[BlockShapes, ...]
    base_elements: int  # 16-bit elements outside the blocks, output head included
    head_name: str
    head: LinearShape
    head_tied: bool
    embedding_name: str = ""  # the token embedding unit (``adapter.embeddings[0]``)
    embedding: LinearShape | None = None  # its table: ``out`` rows (vocabulary) x ``inp`` (hidden)

    @classmethod
    def from_model(cls, model: nn.Module) -> MemoryModel:
        """Read the shapes of ``model`` (GPT-2 normalized, not yet compressed)."""
        adapter = adapter_for(model)
        blocks = []
        linear_ids = set()
        for index, block in enumerate(adapter.blocks(model)):
            linears = adapter.block_linears(block)
            for module in linears.values():
                linear_ids.update(id(t) for t in module.state_dict(keep_vars=True).values())
            other = sum(t.numel() for t in _unique(block.state_dict(keep_vars=True).values())
                        if id(t) not in linear_ids)
            blocks.append(BlockShapes(head_layout(model, index), adapter.mlp_channels(block),
                                      {role: _shape(m) for role, m in linears.items()}, other))
        block_ids = {id(t) for block in adapter.blocks(model) for t in block.state_dict(keep_vars=True).values()}
        base = sum(t.numel() for t in _unique(model.state_dict(keep_vars=True).values()) if id(t) not in block_ids)
        head = model.get_submodule(adapter.lm_head)
        embeddings = {model.get_submodule(name).weight.data_ptr() for name in adapter.embeddings}
        tied = head.weight.data_ptr() in embeddings
        table = model.get_submodule(adapter.embeddings[0]).weight
        return cls(adapter.blocks_path, dict(adapter.linears), tuple(blocks), base, adapter.lm_head,
                   _shape(head), tied, adapter.embeddings[0], LinearShape(table.shape[0], table.shape[1], False))

    def block_bytes(self, index: int, choice: Choice, linear_choices: dict[str, Choice] | None = None) -> int:
        """Stored bytes of block ``index`` under ``choice`` (``linear_choices``: path -> override)."""
        if choice.drop:
            return 0
        shapes = self.blocks[index]
        total = shapes.other_elements * STORAGE_BYTES
        for role, shape in pruned_shapes(shapes, choice).items():
            total += linear_bytes(shape, (linear_choices or {}).get(self.paths[role], choice).for_role(role))
        return total

    def block_parameters(self, index: int, choice: Choice) -> int:
        """Stored parameters (elements, codes counted as one each) of block ``index`` under ``choice``."""
        if choice.drop:
            return 0
        shapes = self.blocks[index]
        return shapes.other_elements + sum(s.out * s.inp + (s.out if s.bias else 0)
                                           for s in pruned_shapes(shapes, choice).values())

    def embedding_bytes(self, choice: Choice | None = None) -> int:
        """Stored bytes of the token embedding unit under ``choice`` (a tied head included, it
        shares the table): packed codes plus an fp16 scale and zero per (row, group) when
        quantized, 2 bytes per element otherwise. An untied head is not part of it."""
        table = self.embedding
        if table is None:
            raise ValueError("this MemoryModel was built without the embedding's shape")
        return linear_bytes(table, choice or Choice())

    def base_bytes(self, head_choice: Choice | None = None, embedding_choice: Choice | None = None) -> int:
        """Bytes outside the blocks: embeddings (the token table quantized if chosen, a tied
        head with it), final norm, output head (quantized if chosen)."""
        total = self.base_elements * STORAGE_BYTES
        if embedding_choice is not None and embedding_choice.quantized:
            total += self.embedding_bytes(embedding_choice) - self.embedding_bytes()
        if head_choice is None or not head_choice.changes_weights:
            return total
        head_16bit = self.head.out * self.head.inp * STORAGE_BYTES
        # A tied head shares the embedding's storage; quantizing it on its own (which a schedule
        # cannot ask for: Schedule.validate names the embedding unit instead) adds a separate copy.
        return total + linear_bytes(LinearShape(self.head.out, self.head.inp, False), head_choice) \
            - (0 if self.head_tied else head_16bit)

    def schedule_bytes(self, schedule: Schedule) -> int:
        """Stored bytes of the whole model compressed by ``schedule``."""
        paths = list(self.paths.values())
        total = self.base_bytes(schedule.units.get(self.head_name), schedule.units.get(self.embedding_name))
        for index in range(len(self.blocks)):
            choice, linears = schedule.block_plan(self.blocks_path, index, paths)
            total += self.block_bytes(index, choice, linears)
        return total

    def schedule_parameters(self, schedule: Schedule) -> int:
        """Stored parameters of the model compressed by ``schedule`` (tied embeddings once)."""
        paths = list(self.paths.values())
        total = self.base_elements
        head = schedule.units.get(self.head_name)
        if head is not None and head.changes_weights and self.head_tied:
            total += self.head.out * self.head.inp
        for index in range(len(self.blocks)):
            total += self.block_parameters(index, schedule.block_plan(self.blocks_path, index, paths)[0])
        return total


def _unique(tensors):
    seen = set()
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            yield tensor


def unit_bytes(memory: MemoryModel, unit: str, choice: Choice, block_choice: Choice | None = None) -> int:
    """Stored bytes of one unit (a block, a linear inside a block, the token embedding with a
    tied head, or the output head).

    For a linear, ``block_choice`` supplies the block's structured pruning (default: none).
    """
    if unit == memory.embedding_name:
        return memory.embedding_bytes(choice)
    if unit == memory.head_name:
        return linear_bytes(LinearShape(memory.head.out, memory.head.inp, memory.head.bias), choice)
    prefix = memory.blocks_path + "."
    if not unit.startswith(prefix):
        raise KeyError(f"unknown unit {unit!r}")
    index_text, _, path = unit[len(prefix):].partition(".")
    index = int(index_text)
    if not path:
        return memory.block_bytes(index, choice)
    role = next(r for r, p in memory.paths.items() if p == path)
    shape = pruned_shapes(memory.blocks[index], block_choice or Choice())[role]
    return linear_bytes(shape, choice)


def model_bytes(model: nn.Module, schedule: Schedule) -> int:
    """Stored bytes of ``model`` (uncompressed) once compressed by ``schedule``."""
    return MemoryModel.from_model(model).schedule_bytes(schedule)


def model_parameters(model: nn.Module, schedule: Schedule) -> int:
    """Stored parameters of ``model`` once compressed by ``schedule`` (tied embeddings once)."""
    return MemoryModel.from_model(model).schedule_parameters(schedule)


def stored_bytes(model: nn.Module) -> int:
    """Bytes a (compressed, in-memory) model's tensors take as saved: floats at 16 bits."""
    total = 0
    for tensor in _unique(model.state_dict(keep_vars=True).values()):
        size = STORAGE_BYTES if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def dense_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` stored entirely in 16 bits (the uncompressed reference)."""
    return sum(t.numel() for t in _unique(model.state_dict(keep_vars=True).values())) * STORAGE_BYTES


__all__ = ["MemoryModel", "LinearShape", "BlockShapes", "linear_bytes", "unit_bytes", "model_bytes",
           "model_parameters", "stored_bytes", "dense_bytes"]
