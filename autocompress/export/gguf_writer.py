"""Write a compressed in-memory model as one GGUF file that llama.cpp (ollama, LM Studio) runs.

Each weight gets the GGUF type closest to what autocompress holds:

* a module that already holds GGUF blocks (a string ``gguf_type`` and a uint8 ``blocks``
  [rows, row bytes], :mod:`autocompress.compress.gguf_linear`) is written verbatim;
* a :class:`~autocompress.compress.quantize.QuantLinear` (or quantized embedding) of b bits is
  requantized from its dequantized weight: 8 -> Q8_0, 6 -> Q6_K, 5 -> Q5_K, 4 -> Q4_K,
  3 -> Q3_K, 2 -> Q2_K, through llama.cpp's fallback where rows do not hold whole blocks;
* 16-bit linears and embeddings are F16 (BF16 beyond fp16's range), norms and biases F32.

Architectures: Llama and Mistral are GGUF ``llama``, Qwen2 is ``qwen2``. A Llama whose blocks
differ in head count, key/value head count or MLP width (pruned unevenly) is written as
``deci``, llama.cpp's architecture for pruned Llama models, which reads those three as
per-layer arrays. Dropped blocks are gone from the model already; the rest are ``blk.0`` to
``blk.N-1``.

llama.cpp's ``llama``/``deci`` rope rotates adjacent pairs where Hugging Face rotates halves,
so Q and K rows are permuted per head, as llama.cpp's converter does (:func:`rope_permutation`).
GGUF blocks run along a row, so permuting the rows of a verbatim block array is exact.

Example::

    apply(model, schedule, tokens)
    export = export_gguf(model, tokenizer, "runs/x/model.gguf")
    reference = as_exported(model, export)   # what llama.cpp computes
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from ..errors import UserError
from ..models import adapter_for, config_head_dim
from ..progress import progress_bar
from .gguf_tokenizer import add_tokenizer

# autocompress family -> GGUF architecture (uniform shapes).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Architectures whose rope needs llama.cpp's Q/K row permutation (rope type NORM, not NEOX).
PERMUTED_ARCHITECTURES = ("llama", "deci")
# Bits of a QuantLinear -> the GGUF type it is requantized to (before the row-length fallback).
REQUANT_TYPES = {8: "Q8_0", 6: "Q6_K", 5: "Q5_K", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K"}
DENSE_TYPES = ("F32", "F16", "BF16")
FP16_MAX = 65504.0

# role in the block -> GGUF tensor name (without "blk.N." and ".weight")
BLOCK_TENSORS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                 "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
BLOCK_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _quants():
    from . import gguf_quants  # noqa: PLC0415  (numpy packers, only needed when exporting)

    return gguf_quants


@dataclass(frozen=True)
class BlockShape:
    """What llama.cpp needs to know per block: head counts and MLP width."""

    heads: int
    kv_heads: int
    channels: int


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the file.

    ``shape`` is PyTorch's (rows, columns). ``exact`` is True when the file holds exactly the
    values autocompress computes with (verbatim GGUF blocks, 16-bit or F32 values), False when
    requantized. ``source`` is the module path (``model.layers.3.self_attn.q_proj``) or the
    parameter path of a norm; ``source_bits``/``source_group_size`` describe the source
    quantization (16 and None for 16-bit weights, None for GGUF-typed modules and norms).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    bytes: int
    exact: bool
    source: str
    source_bits: int | None = None
    source_group_size: int | None = None
    permuted: bool = False


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote: the file, its architecture, per-block shapes, one record
    per tensor (file order), the file's size, and whether the head shares the embedding's tensor."""

    path: Path
    arch: str
    blocks: list[BlockShape]
    records: list[TensorRecord] = field(default_factory=list)
    total_bytes: int = 0
    tied_head: bool = False

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (the file less its metadata and padding)."""
        return sum(record.bytes for record in self.records)

    @property
    def requantized(self) -> list[TensorRecord]:
        """Tensors whose values differ from the in-memory model's."""
        return [record for record in self.records if not record.exact]


# ---------------------------------------------------------------------------------------
# Shapes and the rope permutation


def rope_permutation(heads: int, head_dim: int) -> torch.Tensor:
    """Row order [heads * head_dim] taking Hugging Face Q/K rows to llama.cpp's: ``gguf = hf[perm]``.

    Within a head HF keeps the two halves of each rotated pair ``head_dim / 2`` rows apart;
    llama.cpp keeps them adjacent. ``perm.argsort()`` undoes it.
    """
    return torch.arange(heads * head_dim).reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _supported(model: nn.Module) -> tuple[object, str]:
    adapter = adapter_for(model)
    arch = ARCHITECTURES.get(adapter.family)
    if arch is None:
        names = ", ".join(sorted(ARCHITECTURES))
        raise UserError(f"GGUF export does not support the {adapter.family!r} family; supported: {names}")
    return adapter, arch


def _kept_blocks(model: nn.Module, adapter) -> list[tuple[int, nn.Module]]:
    """(index in the model, block) of every real block; a stand-in for a dropped one is skipped."""
    return [(index, block) for index, block in enumerate(adapter.blocks(model))
            if type(block).__name__ != "DroppedBlock"]


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """Per-block head counts and MLP width, read from the weight shapes (pruning included)."""
    adapter = adapter_for(model)
    head_dim = config_head_dim(model.config)
    shapes = []
    for _, block in _kept_blocks(model, adapter):
        linears = adapter.block_linears(block)
        shapes.append(BlockShape(int(linears["o"].in_features) // head_dim,
                                 int(linears["k"].out_features) // head_dim, int(linears["down"].in_features)))
    return shapes


def _architecture(family_arch: str, shapes: list[BlockShape]) -> str:
    uniform = len(set(shapes)) <= 1
    if uniform:
        return family_arch
    if family_arch == "llama":
        return "deci"
    raise UserError(f"GGUF export of a {family_arch} model needs the same head counts and MLP width in every block "
                    f"(llama.cpp's {family_arch} has no per-layer sizes); prune its blocks evenly or not at all")


# ---------------------------------------------------------------------------------------
# Tensor payloads


@dataclass
class _Payload:
    """What one tensor's data is: numpy float32/float16, or uint8 rows of ``type`` (blocks, BF16)."""

    data: np.ndarray
    type: str
    exact: bool


def _is_gguf_typed(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gguf_type", None), str) and isinstance(getattr(module, "blocks", None),
                                                                              torch.Tensor)


def _dense_payload(weight: torch.Tensor) -> _Payload:
    """F16 (BF16 if out of fp16's range, or already bf16) of a dense weight; exact if no value changes."""
    weight = weight.detach().cpu()
    if weight.dtype == torch.bfloat16 or (weight.numel() and weight.float().abs().max().item() > FP16_MAX):
        stored = weight.to(torch.bfloat16)
        data = stored.contiguous().view(torch.int16).numpy().view(np.uint8)
        kind = "BF16"
    else:
        stored = weight.to(torch.float16)
        data = stored.contiguous().numpy()
        kind = "F16"
    exact = bool(torch.equal(stored.float(), weight.float()))
    return _Payload(data, kind, exact)


def requant_type(bits: int, row_length: int) -> str:
    """The GGUF type a ``bits``-bit weight with rows of ``row_length`` is requantized to."""
    target = REQUANT_TYPES.get(bits)
    if target is None:
        raise UserError(f"no GGUF type for {bits}-bit weights; supported bits: {sorted(REQUANT_TYPES)}")
    try:
        return _quants().fallback_type(target, row_length)
    except UserError:  # no block type fits the row at all
        return "F16"


def _requantized(weight: torch.Tensor, bits: int, importance: torch.Tensor | None) -> _Payload:
    """``weight`` [rows, cols] (already in GGUF row order) quantized to the GGUF type for ``bits``."""
    kind = requant_type(bits, weight.shape[1])
    if kind in DENSE_TYPES:
        payload = _dense_payload(weight)
        return _Payload(payload.data, payload.type, False)
    array = np.ascontiguousarray(weight.detach().to("cpu", torch.float32).numpy())
    weights = None if importance is None else np.ascontiguousarray(
        importance.detach().to("cpu", torch.float32).numpy())
    return _Payload(_quants().quantize(array, kind, weights), kind, False)


def _rows(perm: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if perm is None else tensor[perm.to(tensor.device)]


def _payload(item: nn.Module | torch.Tensor, perm: torch.Tensor | None, importance: torch.Tensor | None
             ) -> tuple[_Payload, int | None, int | None, tuple[int, ...]]:
    """(payload, source bits, source group size, PyTorch shape) of a weight module or a 1-D tensor."""
    from ..compress.quant_embedding import QuantEmbedding  # noqa: PLC0415
    from ..compress.quantize import QuantLinear  # noqa: PLC0415

    if isinstance(item, torch.Tensor):  # norms and biases
        data = _rows(perm, item.detach().float().cpu()).contiguous().numpy()
        return _Payload(data, "F32", True), None, None, tuple(item.shape)
    if _is_gguf_typed(item):
        blocks = _rows(perm, item.blocks.detach().cpu()).contiguous().numpy()
        cols = getattr(item, "in_features", None) or item.embedding_dim
        return _Payload(blocks, item.gguf_type, True), None, None, (blocks.shape[0], int(cols))
    if isinstance(item, (QuantLinear, QuantEmbedding)):
        weight = _rows(perm, item.dequantized_weight().float())
        return _requantized(weight, item.bits, importance), item.bits, item.group_size, tuple(weight.shape)
    weight = getattr(item, "weight", None)
    if isinstance(item, (nn.Linear, nn.Embedding)) and isinstance(weight, torch.Tensor):
        return _dense_payload(_rows(perm, weight)), 16, None, tuple(weight.shape)
    raise UserError(f"GGUF export cannot write a {type(item).__name__} layer; merge adapters (LoRA) and save "
                    f"the model with plain, quantized or GGUF-typed linears")


def _head_is_tied(model: nn.Module, adapter) -> bool:
    head = model.get_submodule(adapter.lm_head)
    embedding = model.get_submodule(adapter.embeddings[0])
    if getattr(head, "embedding", None) is embedding:
        return True
    for attribute in ("weight", "blocks", "packed"):
        a, b = getattr(head, attribute, None), getattr(embedding, attribute, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and (
                a is b or a.data_ptr() == b.data_ptr()):
            return True
    return False


# ---------------------------------------------------------------------------------------
# Metadata


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params.get("full_attention", params)) if isinstance(params, dict) else {}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _rope_factors(model: nn.Module, config, head_dim: int) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` (per-frequency divisors) for Llama 3 rope scaling, read off the
    model's own inverse frequencies, or None when the rope is not scaled that way."""
    params = _rope_parameters(config)
    if str(params.get("rope_type", "default")).lower() != "llama3":
        return None
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise UserError("the model's Llama 3 rope scaling has no inverse frequencies to export")
    theta = float(params.get("rope_theta", 10000.0))
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (plain / inv_freq.detach().double().cpu()).float().numpy()


def _add_metadata(writer, model: nn.Module, arch: str, shapes: list[BlockShape], head_dim: int) -> None:
    """The ``general.*`` and ``{arch}.*`` keys llama.cpp reads (all but ``general.file_type``)."""
    import gguf  # noqa: PLC0415

    config = model.config
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    writer.add_name(Path(str(name)).name or "model")
    writer.add_block_count(len(shapes))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    if arch == "deci":
        writer.add_head_count([s.heads for s in shapes])
        writer.add_head_count_kv([s.kv_heads for s in shapes])
        writer.add_feed_forward_length([s.channels for s in shapes])
    else:
        writer.add_head_count(shapes[0].heads)
        writer.add_head_count_kv(shapes[0].kv_heads)
        writer.add_feed_forward_length(shapes[0].channels)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    params = _rope_parameters(config)
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", "default")).lower()
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise UserError(f"GGUF export does not support {rope_type!r} rope scaling; supported: linear, yarn, llama3")
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_types() -> dict:
    """GGUF type -> ``general.file_type`` (llama.cpp's name for a file mostly of that type)."""
    import gguf  # noqa: PLC0415

    t = gguf.LlamaFileType
    return {"F32": t.ALL_F32, "F16": t.MOSTLY_F16, "BF16": t.MOSTLY_BF16, "Q8_0": t.MOSTLY_Q8_0,
            "Q6_K": t.MOSTLY_Q6_K, "Q5_K": t.MOSTLY_Q5_K_M, "Q5_1": t.MOSTLY_Q5_1, "Q5_0": t.MOSTLY_Q5_0,
            "Q4_K": t.MOSTLY_Q4_K_M, "Q4_1": t.MOSTLY_Q4_1, "Q4_0": t.MOSTLY_Q4_0, "Q3_K": t.MOSTLY_Q3_K_M,
            "Q2_K": t.MOSTLY_Q2_K}


# ---------------------------------------------------------------------------------------
# Export


def _plan(model: nn.Module, adapter, arch: str, shapes: list[BlockShape], head_dim: int):
    """(gguf name, source path, module or tensor, row permutation) for every tensor, in file order."""
    permute = arch in PERMUTED_ARCHITECTURES
    items = [("token_embd.weight", adapter.embeddings[0], model.get_submodule(adapter.embeddings[0]), None)]
    for index, ((original, block), shape) in enumerate(zip(_kept_blocks(model, adapter), shapes)):
        name = f"{adapter.blocks_path}.{original}"
        for norm, gguf_norm in BLOCK_NORMS.items():
            items.append((f"blk.{index}.{gguf_norm}.weight", f"{name}.{norm}.weight",
                          block.get_submodule(norm).weight, None))
        perms = {"q": rope_permutation(shape.heads, head_dim) if permute else None,
                 "k": rope_permutation(shape.kv_heads, head_dim) if permute else None}
        for role, gguf_name in BLOCK_TENSORS.items():
            path = adapter.linears[role]
            module = block.get_submodule(path)
            items.append((f"blk.{index}.{gguf_name}.weight", f"{name}.{path}", module, perms.get(role)))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                items.append((f"blk.{index}.{gguf_name}.bias", f"{name}.{path}.bias", bias, perms.get(role)))
    items.append(("output_norm.weight", f"{adapter.final_norm}.weight",
                  model.get_submodule(adapter.final_norm).weight, None))
    if not _head_is_tied(model, adapter):
        head = model.get_submodule(adapter.lm_head)
        if isinstance(getattr(head, "bias", None), torch.Tensor):
            raise UserError("GGUF export does not support a bias on the output head (llama.cpp's llama has none)")
        items.append(("output.weight", adapter.lm_head, head, None))
    return items


def export_gguf(model: nn.Module, tokenizer, out_path: str | os.PathLike, *,
                importance: dict[str, torch.Tensor] | None = None, progress: bool = True) -> GGUFExport:
    """Write ``model`` (compressed by autocompress, in memory) and ``tokenizer`` as a GGUF file.

    ``importance`` maps a linear's module path (as ``model.named_modules()`` names it) to the
    per-column mean of x² over calibration inputs; requantization then weighs its error by
    it. The file is written to a temporary sibling and renamed into place, so ``out_path``
    is either the old file or the new one, whole. Raises :class:`UserError` for a family,
    shape, layer or tokenizer GGUF cannot express.

    Example::

        export = export_gguf(model, tokenizer, "model.gguf", progress=False)
        export.arch, export.total_bytes, export.requantized
    """
    import gguf  # noqa: PLC0415

    adapter, family_arch = _supported(model)
    shapes = block_shapes(model)
    if not shapes:
        raise UserError("the model has no decoder blocks left; keep at least one")
    arch = _architecture(family_arch, shapes)
    head_dim = config_head_dim(model.config)
    importance = importance or {}
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
        os.close(handle)
    except OSError as exc:
        raise UserError(f"cannot write {out_path}: {exc.strerror or exc}; choose another output path") from None
    temp = Path(temp_name)
    records: list[TensorRecord] = []
    tied = _head_is_tied(model, adapter)
    try:
        # Tensors are spooled to a temporary file as they are made, so only one is in memory.
        writer = gguf.GGUFWriter(temp, arch, use_temp_file=True)
        _add_metadata(writer, model, arch, shapes, head_dim)
        add_tokenizer(writer, tokenizer, int(model.config.vocab_size))
        items = _plan(model, adapter, arch, shapes, head_dim)
        counts: dict[str, int] = {}
        with torch.no_grad(), progress_bar("writing GGUF tensors", len(items), progress) as advance:
            for name, source, item, perm in items:
                payload, bits, group, shape = _payload(item, perm, importance.get(source))
                raw = None if payload.type in ("F32", "F16") else gguf.GGMLQuantizationType[payload.type]
                writer.add_tensor(name, payload.data, raw_dtype=raw)
                records.append(TensorRecord(name, payload.type, shape, int(payload.data.nbytes), payload.exact,
                                            source, bits, group, perm is not None))
                if len(shape) == 2:
                    counts[payload.type] = counts.get(payload.type, 0) + int(np.prod(shape))
                advance()
        factors = _rope_factors(model, model.config, head_dim)
        if factors is not None:
            writer.add_tensor("rope_freqs.weight", factors)
            records.append(TensorRecord("rope_freqs.weight", "F32", tuple(factors.shape), int(factors.nbytes), True,
                                        "rope_freqs"))
        file_type = max(counts, key=counts.get)  # what most weights are, as llama.cpp names files
        writer.add_file_type(_file_types().get(file_type, gguf.LlamaFileType.MOSTLY_F16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(temp, out_path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {out_path}: {exc.strerror or exc}; free some space or choose another "
                            f"output path") from None
        raise
    return GGUFExport(out_path, arch, shapes, records, out_path.stat().st_size, tied)


# ---------------------------------------------------------------------------------------
# The model llama.cpp computes


def read_dense(reader, name: str) -> torch.Tensor:
    """A tensor of a :class:`gguf.GGUFReader` as fp32 in PyTorch's (rows, columns) order."""
    import gguf  # noqa: PLC0415

    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        raise UserError(f"the GGUF file has no tensor {name!r}; it was not written by autocompress export")
    kind = tensor.tensor_type.name
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    data = np.asarray(tensor.data)
    if kind in ("F32", "F16", "BF16"):
        dense = gguf.quants.dequantize(data, tensor.tensor_type)
    else:
        dense = _quants().dequantize(data.reshape(shape[0] if len(shape) > 1 else 1, -1), kind, shape[-1])
    return torch.from_numpy(np.array(dense, dtype=np.float32)).reshape(shape)


@torch.no_grad()
def as_exported(model: nn.Module, export: GGUFExport) -> nn.Module:
    """A copy of ``model`` whose requantized tensors hold the values the GGUF file holds.

    That is what llama.cpp computes with the export, so comparing it with ``model`` measures
    the error requantization adds. Modules written exactly (16-bit, verbatim GGUF blocks) are
    kept; ``model`` itself is returned when nothing was requantized.
    """
    import gguf  # noqa: PLC0415

    changed = export.requantized
    if not changed:
        return model
    adapter = adapter_for(model)
    copied = copy.deepcopy(model)
    reader = gguf.GGUFReader(export.path)
    dtype = next(p for p in copied.parameters() if p.is_floating_point()).dtype
    for record in changed:
        dense = read_dense(reader, record.name)
        if record.permuted:
            heads = dense.shape[0] // config_head_dim(model.config)
            dense = dense[rope_permutation(heads, config_head_dim(model.config)).argsort()]
        if record.source == adapter.embeddings[0]:
            old = copied.get_submodule(record.source)
            embedding = skip_init(nn.Embedding, dense.shape[0], dense.shape[1],
                                  padding_idx=getattr(old, "padding_idx", None), dtype=dtype)
            embedding.weight.data.copy_(dense)
            _set(copied, record.source, embedding)
            if export.tied_head:
                head = skip_init(nn.Linear, dense.shape[1], dense.shape[0], bias=False, dtype=dtype)
                head.weight = embedding.weight
                _set(copied, adapter.lm_head, head)
            continue
        old = copied.get_submodule(record.source)
        bias = getattr(old, "bias", None)
        linear = skip_init(nn.Linear, dense.shape[1], dense.shape[0], bias=bias is not None, dtype=dtype)
        linear.weight.data.copy_(dense)
        if bias is not None:
            linear.bias.data.copy_(bias.detach())
        _set(copied, record.source, linear)
    return copied


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


__all__ = ["BlockShape", "GGUFExport", "TensorRecord", "as_exported", "block_shapes", "export_gguf", "read_dense",
           "requant_type", "rope_permutation"]
