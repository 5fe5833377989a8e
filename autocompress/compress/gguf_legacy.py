"""llama.cpp's legacy block quantization types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) via the ``gguf`` package.

A GGUF tensor is stored row by row along its last dimension (in_features), each row cut
into blocks of 32 values. A block holds an fp16 scale ``d`` (the ``_1`` types also an fp16
minimum ``m``) and 32 integer codes: ``x = d * q`` for the symmetric ``_0`` types (Q8_0:
q in [-127, 127]; Q5_0/Q4_0: q in [-16, 15] / [-8, 7]) and ``x = d * q + m`` for the
asymmetric ``_1`` types (q in [0, 31] / [0, 15]).

Rather than re-implement these formats, quantization and dequantization go through the
``gguf`` package (llama.cpp's own Python reference, bit-exact with ``ggml-quants.c`` for
these types), so :func:`gguf_fake_quantize` yields the dense weight a llama.cpp runtime
would actually compute with, and :func:`gguf_tensor_bytes` the exact size in the file.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

# Largest first: the order a size-driven search would step down through.
GGUF_LEGACY = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def _quant_type(type_name: str) -> GGMLQuantizationType:
    """The ggml type of a legacy type name."""
    if type_name not in GGUF_LEGACY:
        raise ValueError(f"unknown GGUF legacy type {type_name!r}; expected one of {GGUF_LEGACY}")
    return GGMLQuantizationType[type_name]


def _check_blocks(in_features: int, type_name: str) -> tuple[int, int]:
    """(block size, bytes per block) of ``type_name``; rows must hold whole blocks."""
    block_size, type_size = GGML_QUANT_SIZES[_quant_type(type_name)]
    if in_features % block_size:
        raise ValueError(f"{type_name} needs in_features divisible by {block_size}, got {in_features}")
    return block_size, type_size


def gguf_tensor_bytes(shape: Sequence[int], type_name: str) -> int:
    """Exact bytes of a tensor of ``shape`` (in_features last) stored as ``type_name``."""
    in_features = int(shape[-1])
    block_size, type_size = _check_blocks(in_features, type_name)
    rows = math.prod(int(size) for size in shape[:-1])
    return rows * (in_features // block_size) * type_size


@torch.no_grad()
def gguf_fake_quantize(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    """The fp32 weight llama.cpp reconstructs from ``weight`` quantized to ``type_name``.

    Blocks of 32 run along the last dimension (in_features); the result has ``weight``'s shape
    and device.
    """
    _check_blocks(weight.shape[-1], type_name)
    qtype = _quant_type(type_name)
    array = weight.detach().to("cpu", torch.float32).numpy()
    dense = dequantize(quantize(np.ascontiguousarray(array), qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(weight.shape).to(weight.device)
