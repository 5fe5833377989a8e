"""GGUF block quantizers, bit-exact with llama.cpp's ggml-quants.c: the public API and the
legacy 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

The `gguf` package quantizes only the legacy types, so this module packs every weight type
`autocompress export --format gguf` writes. Each packer follows the C code it mirrors:
without importance the `quantize_row_<type>_ref` functions, with importance the imatrix path
of `quantize_<type>` (`quantize_row_<type>_impl`, `make_qx_quants`, `make_qkx3_quants`).
The K types (Q2_K..Q6_K), the scale searches and the float32 rules that keep all of it
bit-exact live in :mod:`autocompress.export.gguf_kquants`.
"""

from __future__ import annotations

import numpy as np
import torch

from autocompress.errors import UserError

from .gguf_kquants import (K_PACKERS, F, _first_absmax, _fp16, _make_qkx_quants, _make_qx_quants, _pos_major,
                           _seqsum, _u8)

GGUF_WEIGHT_TYPES: tuple[str, ...] = (
    "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K",
)

_LAYOUT = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q5_1": (32, 24), "Q5_0": (32, 22), "Q4_1": (32, 20), "Q4_0": (32, 18),
    "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144), "Q3_K": (256, 110), "Q2_K": (256, 84),
}
# src/llama-quant.cpp, tensor_type_fallback: a 256-block type demotes to a 32-block one.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


# ---------------------------------------------------------------- public API


def block_layout(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGUF type; F16/BF16/F32 are blocks of one value."""
    if type_name not in _LAYOUT:
        raise UserError(f"unknown GGUF type {type_name!r}; expected one of {', '.join(_LAYOUT)}")
    return _LAYOUT[type_name]


def fallback_type(type_name: str, row_length: int) -> str:
    """The type llama.cpp uses for rows of `row_length` values when `type_name` is asked for.

    A K type whose 256-value block does not divide the row falls back to a 32-value type
    (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). Where even that does not
    divide (llama.cpp would silently write F16) this raises UserError instead.
    """
    qk, _ = block_layout(type_name)
    if row_length % qk == 0:
        return type_name
    fallback = _FALLBACK.get(type_name, type_name)
    if row_length % block_layout(fallback)[0]:
        raise UserError(
            f"rows of {row_length} values fit neither {type_name} nor its fallback {fallback}; "
            f"GGUF block types need a row length that is a multiple of 32 (use F16 for this tensor)"
        )
    return fallback


def row_bytes(type_name: str, row_length: int) -> int:
    """Exact bytes of one row of `row_length` values; the type's block must divide the row."""
    qk, size = block_layout(type_name)
    if row_length % qk:
        raise UserError(
            f"{type_name} needs rows that are a multiple of {qk} values, got {row_length}; "
            f"pick the type with fallback_type({type_name!r}, {row_length})"
        )
    return row_length // qk * size


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a whole tensor of `shape` (the last dimension is the row) stored as `type_name`."""
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_bytes(type_name, int(shape[-1]))


def quantize(weight, type_name: str, importance=None) -> np.ndarray:
    """Pack a [rows, cols] weight into GGUF blocks exactly as llama.cpp's llama-quantize would.

    `importance` is the per-column imatrix (mean squared activation, length cols); it selects
    llama.cpp's imatrix-weighted search. Q8_0, F16, BF16 and F32 ignore it. Returns uint8
    [rows, row_bytes(type_name, cols)]. No fallback is applied: see `fallback_type`.

    >>> quantize(np.ones((2, 256), np.float32), "Q4_K").shape
    (2, 144)
    """
    x = _as_matrix(weight)
    rows, cols = x.shape
    nbytes = row_bytes(type_name, cols)
    imp = None
    if importance is not None and type_name not in ("Q8_0", "F16", "BF16", "F32"):
        imp = np.ascontiguousarray(_as_array(importance).reshape(-1))
        if imp.shape != (cols,) or not np.isfinite(imp).all():
            raise UserError(
                f"importance must be {cols} finite per-column values, got shape {tuple(imp.shape)}"
            )
    if rows == 0:
        return np.zeros((0, nbytes), np.uint8)
    if type_name == "F32":
        return x.view(np.uint8).reshape(rows, nbytes).copy()
    if type_name == "F16":
        return _fp16(x.reshape(-1)).reshape(rows, nbytes)
    if type_name == "BF16":
        return _to_bf16(x).view(np.uint8).reshape(rows, nbytes)
    qk = block_layout(type_name)[0]
    blocks = x.reshape(-1, qk)
    # lanes C would skip (zero blocks, rejected candidates) may divide by zero here: ignored
    with np.errstate(all="ignore"):
        if imp is None:
            out = _REF[type_name](blocks)
        else:
            out = _IMPL[type_name](blocks, np.broadcast_to(imp, x.shape).reshape(-1, qk), x)
    return out.reshape(rows, nbytes)


def dequantize(data: np.ndarray, type_name: str, row_length: int) -> np.ndarray:
    """Float32 [rows, row_length] values of GGUF bytes (llama.cpp's dequantize_row_* via `gguf`)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    nbytes = row_bytes(type_name, row_length)
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nbytes)
    if type_name == "F32":
        return raw.view(np.float32).copy()
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    out = gguf_dequantize(raw, GGMLQuantizationType[type_name])
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], row_length)


def fake_quantize(weight: torch.Tensor, type_name: str, importance=None) -> torch.Tensor:
    """The dense fp32 weight llama.cpp computes with after storing `weight` as `type_name`.

    Applies llama.cpp's fallback for the row length first (`fallback_type`), so the result is
    what the GGUF file would really hold. Same shape and device as `weight`.
    """
    rows, cols = weight.shape
    kind = fallback_type(type_name, cols)
    packed = quantize(weight, kind, importance)
    dense = dequantize(packed, kind, cols)
    return torch.from_numpy(dense).to(weight.device)


# ---------------------------------------------------------------- input and bf16 conversion


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


def _as_matrix(weight) -> np.ndarray:
    x = _as_array(weight)
    if x.ndim != 2:
        raise UserError(f"quantize needs a 2-D [rows, cols] weight, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 64, rounded).astype(np.uint16)


# ---------------------------------------------------------------- legacy 32-value types


def _legacy_absmax_ref(blocks, div, offset, top):
    amax, vmax = _first_absmax(_pos_major(blocks, 32))
    d = vmax / F(div)
    idv = np.where(d != 0, F(1) / np.where(d != 0, d, F(1)), F(0))
    q = np.trunc(blocks * idv[:, None] + F(offset)).astype(np.int64)
    return d, np.minimum(top, ((q + 128) & 0xFF) - 128)  # (int8_t) then MIN


def _legacy_minmax_ref(blocks, div):
    xt = _pos_major(blocks, 32)
    lo, hi = xt[0].copy(), xt[0].copy()
    for row in xt[1:]:
        lo = np.where(row < lo, row, lo)
        hi = np.where(row > hi, row, hi)
    d = (hi - lo) / F(div)
    idv = np.where(d != 0, F(1) / np.where(d != 0, d, F(1)), F(0))
    q = np.trunc((blocks - lo[:, None]) * idv[:, None] + F(0.5)).astype(np.int64)
    return d, lo, q


def _nibbles(L):
    return _u8((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4))


def _qh32(L):
    bits = ((L >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).view(np.uint8).reshape(-1, 4)


def _q4_0_ref(blocks):
    d, L = _legacy_absmax_ref(blocks, -8, 8.5, 15)
    return np.hstack([_fp16(d), _nibbles(L)])


def _q5_0_ref(blocks):
    d, L = _legacy_absmax_ref(blocks, -16, 16.5, 31)
    return np.hstack([_fp16(d), _qh32(L), _nibbles(L)])


def _q4_1_ref(blocks):
    d, lo, q = _legacy_minmax_ref(blocks, 15)
    L = np.minimum(15, ((q + 128) & 0xFF) - 128)
    return np.hstack([_fp16(d), _fp16(lo), _nibbles(L)])


def _q5_1_ref(blocks):
    d, lo, q = _legacy_minmax_ref(blocks, 31)
    L = q & 0xFF  # (uint8_t), no clamp in C
    return np.hstack([_fp16(d), _fp16(lo), _qh32(L), _nibbles(L)])


def _q8_0_ref(blocks):
    amax = np.abs(blocks).max(axis=1)  # MAX over |x|: order does not matter for a max
    d = amax / F(127)
    idv = np.where(d != 0, F(1) / np.where(d != 0, d, F(1)), F(0))
    v = blocks * idv[:, None]
    t = np.trunc(v)
    q = t + np.where(np.abs(v - t) >= F(0.5), np.sign(v), F(0))  # roundf: half away from zero
    return np.hstack([_fp16(d), _u8(q.astype(np.int64))])


def _row_sigma2(x):
    """sum(x^2)/n_per_row over each row in C order, [rows]."""
    return _seqsum(np.ascontiguousarray(x.T) * np.ascontiguousarray(x.T)) / F(x.shape[1])


def _legacy_weights(blocks, imp, x):
    sigma2 = np.repeat(_row_sigma2(x), x.shape[1] // 32)
    xt, qt = _pos_major(blocks, 32), _pos_major(imp, 32)
    return xt, qt * np.sqrt(sigma2 + xt * xt)


def _q4_0_impl(blocks, imp, x):
    xt, w = _legacy_weights(blocks, imp, x)
    d, L = _make_qx_quants(xt, 8, w)
    return np.hstack([_fp16(d), _nibbles(L.T)])


def _q5_0_impl(blocks, imp, x):
    xt, w = _legacy_weights(blocks, imp, x)
    d, L = _make_qx_quants(xt, 16, w)
    return np.hstack([_fp16(d), _qh32(L.T), _nibbles(L.T)])


def _q4_1_impl(blocks, imp, x):
    xt, w = _legacy_weights(blocks, imp, x)
    d, the_min, L = _make_qkx_quants(xt, 15, w, -0.9, 0.05, 36, False)
    return np.hstack([_fp16(d), _fp16(-the_min), _nibbles(L.T)])


def _q5_1_impl(blocks, imp, x):
    xt, w = _legacy_weights(blocks, imp, x)
    d, the_min, L = _make_qkx_quants(xt, 31, w, -0.9, 0.05, 36, False)
    return np.hstack([_fp16(d), _fp16(-the_min), _qh32(L.T), _nibbles(L.T)])


_REF = {"Q8_0": _q8_0_ref, "Q5_1": _q5_1_ref, "Q5_0": _q5_0_ref, "Q4_1": _q4_1_ref, "Q4_0": _q4_0_ref, **K_PACKERS}
_IMPL = {"Q5_1": _q5_1_impl, "Q5_0": _q5_0_impl, "Q4_1": _q4_1_impl, "Q4_0": _q4_0_impl, **K_PACKERS}
